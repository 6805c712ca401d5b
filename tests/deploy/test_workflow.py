"""GitHub Actions: actionlint and check-jsonschema accept the workflow and dependabot.yml; jobs,
services, permissions and action versions follow the answers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from ..helpers import COMBOS, Combo
from .support import DOCKER, Generated, check_file, check_jsonschema, params, tool

pytestmark = pytest.mark.deploy


# Current major versions of the actions the workflow may use (actionlint flags node20 ones).
CURRENT_ACTIONS = {
    "actions/checkout": "v7",
    "astral-sh/setup-uv": "v10.1.0",  # no moving major tags since v8: a full version
    "docker/setup-buildx-action": "v4",
    "docker/metadata-action": "v6",
    "docker/login-action": "v4",
    "docker/build-push-action": "v7",
}


def check_actionlint(workflow: Path) -> None:
    check_file([tool("actionlint"), "-no-color"], workflow)


def check_workflow_schema(workflow: Path) -> None:
    check_jsonschema("vendor.github-workflows", workflow)


@pytest.mark.parametrize("combo", params(COMBOS))
def test_workflow(generated: Callable[[Combo], Generated], combo: Combo) -> None:
    """actionlint and the workflow schema accept ci.yml (the dependabot schema its
    dependabot.yml); jobs, services and permissions follow the answers."""
    project = generated(combo)
    workflow = project.path / ".github" / "workflows" / "ci.yml"
    check_actionlint(workflow)
    check_workflow_schema(workflow)
    check_jsonschema("vendor.dependabot", project.path / ".github" / "dependabot.yml")

    ci = yaml.safe_load(workflow.read_text())
    assert ci["permissions"] == {"contents": "read"}
    assert "group" in ci["concurrency"] and "cancel-in-progress" in ci["concurrency"]
    jobs = ci["jobs"]
    assert set(jobs) == {"lint", "types", "test"} | (
        {"image"} if combo.deployment in ("docker", "kubernetes") else set()
    )
    for job in jobs.values():
        assert 0 < job["timeout-minutes"] <= 30
        for step in job["steps"]:
            if "uses" in step:
                action, _, ref = step["uses"].partition("@")
                assert CURRENT_ACTIONS.get(action) == ref, f"{step['uses']}: not a current version"
                if action == "astral-sh/setup-uv":
                    assert step["with"]["enable-cache"] is True
    commands = [s["run"] for j in jobs.values() for s in j["steps"] if "run" in s]
    for command in (
        "uv run ruff check",
        "uv run ruff format --check",
        "uv run mypy",
        "uv run pytest",
    ):
        assert any(c.startswith(command) for c in commands), command
    assert ci["env"]["UV_LOCKED"] == "1"
    services = jobs["test"].get("services", {})
    assert set(services) == {
        n for n, on in (("postgres", combo.postgres), ("redis", combo.redis)) if on
    }
    env = jobs["test"].get("env", {})
    assert ("TEST_DATABASE_URL" in env) == combo.postgres and (
        "TEST_REDIS_URL" in env
    ) == combo.redis
    if "image" in jobs:
        image = jobs["image"]
        assert image["permissions"] == {"contents": "read", "packages": "write"}
        assert set(image["needs"]) == {"lint", "types", "test"}
        assert "default_branch" in image["env"]["PUSH"]
        check_image_probe(image, combo)


def check_image_probe(image: dict[str, Any], combo: Combo) -> None:
    """The image job starts the image it built, hardened as compose runs it, and probes
    /health/ready (against service containers for the enabled dependencies) before any step
    that logs in or pushes; those run on the default branch only."""
    steps = image["steps"]
    (probe,) = [i for i, s in enumerate(steps) if "/health/ready" in s.get("run", "")]
    script = steps[probe]["run"]
    for option in ("--read-only", "--tmpfs /tmp", "--cap-drop ALL", "--detach"):
        assert option in script, option
    assert ("alembic upgrade head" in script) == combo.postgres
    assert set(image.get("services", {})) == {
        n for n, on in (("postgres", combo.postgres), ("redis", combo.redis)) if on
    }
    env = steps[probe]["env"]
    assert ("DATABASE_URL" in env) == combo.postgres and ("REDIS_URL" in env) == combo.redis
    # On the runner's own network (--network host): loopback, not the image's 0.0.0.0.
    for name in ("BIND", "METRICS_BIND"):
        assert env[name].startswith("127.0.0.1:") and f"-e {name} " in script, name
    builds = [i for i, s in enumerate(steps) if "build-push-action" in s.get("uses", "")]
    assert builds[0] < probe and steps[builds[0]]["with"]["load"] is True
    pushing = [
        i
        for i, s in enumerate(steps)
        if "login-action" in s.get("uses", "") or s.get("with", {}).get("push") is True
    ]
    assert pushing and min(pushing) > probe, "nothing is pushed before the probe"
    assert all(steps[i]["if"] == "env.PUSH == 'true'" for i in pushing)


def test_workflow_checks_fail_on_broken_copies(
    generated: Callable[[Combo], Generated], tmp_path: Path
) -> None:
    text = (generated(DOCKER[0]).path / ".github" / "workflows" / "ci.yml").read_text()
    workflow = tmp_path / ".github" / "workflows" / "ci.yml"
    workflow.parent.mkdir(parents=True)

    # An action on a runtime GitHub is removing (node20).
    workflow.write_text(text.replace("actions/checkout@v7", "actions/checkout@v4"))
    with pytest.raises(AssertionError, match="node20"):
        check_actionlint(workflow)

    # An image pushed before it was probed.
    ci = yaml.safe_load(text)
    steps = ci["jobs"]["image"]["steps"]
    probe = next(s for s in steps if "/health/ready" in s.get("run", ""))
    steps.remove(probe)
    steps.append(probe)
    with pytest.raises(AssertionError, match="nothing is pushed before the probe"):
        check_image_probe(ci["jobs"]["image"], DOCKER[0])

    # A permission level that does not exist.
    workflow.write_text(text.replace("  contents: read\n", "  contents: readwrite\n", 1))
    with pytest.raises(AssertionError, match="readwrite"):
        check_workflow_schema(workflow)
