"""What the `containers` modules share: a generated project made buildable (its uv.lock), its
image built by podman as compose would build it, build output read step by step, a slow route for
draining, and the figures they report."""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ..containers import standins
from ..containers.engines import Docker, Podman
from ..helpers import ROOT, python_for, run
from .support import RELEASE, Generated, parse_env_file, uv

# Every container test runs in one xdist worker: one Docker daemon, one builder at a time (a
# build takes both cores anyway).
MARKS = [pytest.mark.containers, pytest.mark.xdist_group("containers")]

FIGURES_DIR = ROOT / ".pytest_cache" / "containers"


def buildable(project: Generated, dst: Path) -> Generated:
    """A copy with the uv.lock a user commits (`uv lock`, once): the Dockerfile's `uv sync
    --locked` needs it."""
    copy = project.copy(dst)
    lock(copy)
    return copy


def lock(project: Generated) -> None:
    """`uv lock` in the project, with the Python of its version."""
    run(
        [uv(), "lock", "--python", str(python_for(project.combo.python_version))],
        cwd=project.path,
        env={**os.environ, "UV_PYTHON_DOWNLOADS": "never"},
    )


# The owner a server writes into APP_IMAGE in place of .env.example's OWNER (deploy/README.md,
# "Settings and secrets"): image names are lower case, OWNER itself is not a valid one.
OWNER = "your-org"


def release_image(project: Generated) -> str:
    """The image compose.yaml runs, ${APP_IMAGE}:${APP_TAG}, for a release as the deploy guide
    sets it (APP_IMAGE with an owner, APP_TAG a sha tag): the name CI pushes, which the suite's
    builds take instead, since no registry is reachable."""
    app_image = parse_env_file(project.read(".env.example"))["APP_IMAGE"]
    assert "/OWNER/" in app_image, app_image
    return f"{app_image.replace('/OWNER/', f'/{OWNER}/')}:{RELEASE}"


def set_release(project: Generated) -> None:
    """APP_IMAGE and APP_TAG in the project's .env set to release_image, as a server sets them
    before `docker compose up` (the rest of .env as the task made it)."""
    env = project.path / ".env"
    image, _, tag = release_image(project).rpartition(":")
    text, found = re.subn(r"(?m)^APP_IMAGE=.*$", f"APP_IMAGE={image}", env.read_text())
    text, found_tag = re.subn(r"(?m)^APP_TAG=.*$", f"APP_TAG={tag}", text)
    assert found == found_tag == 1, "the task's .env has no APP_IMAGE or APP_TAG line"
    env.write_text(text)


@dataclass
class Build:
    output: str
    seconds: float

    def steps(self) -> list[tuple[str, bool, str, str]]:
        """(instruction, taken from the cache, resulting layer id, what the step printed) for
        each build step. podman builds a stage when a later one first needs it (a `COPY
        --from`), so a step's output can enclose a whole other stage's: steps are kept on a
        stack, a `--> <id>` line ends the innermost one, and a step that never ends (a FROM) is
        replaced by the next step of its own stage."""
        out: list[tuple[str, bool, str, str]] = []
        # (stage, instruction, cached, printed lines)
        open_steps: list[tuple[str, str, bool, list[str]]] = []
        for line in self.output.splitlines():
            if match := re.match(r"(\[\d+/\d+\]) STEP \d+/\d+: (.*)", line):
                if open_steps and open_steps[-1][0] == match.group(1):
                    open_steps.pop()
                open_steps.append((match.group(1), match.group(2), False, []))
            elif not open_steps:
                continue
            elif line.startswith("--> Using cache "):
                stage, text, _, printed = open_steps[-1]
                open_steps[-1] = (stage, text, True, printed)
            elif match := re.fullmatch(r"--> ([0-9a-f]{6,})", line):
                _, text, cached, printed = open_steps.pop()
                out.append((text, cached, match.group(1), "\n".join(printed)))
            else:
                open_steps[-1][3].append(line)
        return out

    def step(self, fragment: str) -> tuple[bool, str, str]:
        """(taken from the cache, layer id, what it printed) of the one step naming fragment."""
        found = [(c, layer, p) for text, c, layer, p in self.steps() if fragment in text]
        assert len(found) == 1, f"one step with {fragment!r} expected:\n{self.output[-4000:]}"
        return found[0]


def build(
    podman: Podman, project: Generated, tag: str, *args: str, tmpdir: Path | None = None
) -> Build:
    """The generated Dockerfile, as is, built by podman (Docker's format: OCI images have no
    HEALTHCHECK). `tmpdir` holds buildah's cache mounts: a new one is a build with an empty uv
    cache."""
    for standin in standins.for_dockerfile(project.read("Dockerfile")):
        standins.ensure(podman, standin)
    env = {"TMPDIR": str(tmpdir)} if tmpdir else {}
    output, seconds = podman.build(project.path, tag, "--format=docker", *args, env=env)
    return Build(output, seconds)


def wait_until(
    predicate: Callable[[], bool], what: str, timeout: float, why: Callable[[], str] = str
) -> float:
    """Poll until predicate holds; returns the seconds it took; fails with why() after timeout."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not within {timeout}s\n{why()}")
        time.sleep(0.25)
    return time.monotonic() - started


def health(docker: Docker, container: str) -> str:
    proc = docker("inspect", "--format", "{{.State.Health.Status}}", container, check=False)
    return proc.stdout.strip()


def state(docker: Docker, container: str) -> dict[str, Any]:
    return dict(json.loads(docker("inspect", "--format", "{{json .State}}", container).stdout))


def logs(docker: Docker, container: str) -> str:
    proc = docker("logs", container, check=False)
    return proc.stdout + proc.stderr


# A module mounted next to the image (never built into it) for the drain checks: the generated
# application plus one slow route, started through the image's own gunicorn.conf.py (gunicorn's
# positional app argument wins over its wsgi_app), as the drills do.
SLOW_APP = """\
import asyncio
import sys

from fastapi import FastAPI

from {package}.main import create_app


def create() -> FastAPI:
    app = create_app()

    @app.get("/api/v1/test/slow")
    async def slow(seconds: float) -> dict[str, float]:
        print("slow request started", file=sys.stderr, flush=True)
        await asyncio.sleep(seconds)
        return {{"slept": seconds}}

    return app
"""


def slow_app_dir(project: Generated, tmp_path: Path) -> Path:
    directory = tmp_path / "slow_app"
    directory.mkdir(exist_ok=True)
    (directory / "slow_app.py").write_text(SLOW_APP.format(package=project.package))
    directory.chmod(0o755)
    (directory / "slow_app.py").chmod(0o644)
    return directory


SLOW_COMMAND = ["gunicorn", "-c", "gunicorn.conf.py", "slow_app:create()"]


def report(request: pytest.FixtureRequest, kind: str, figures: dict[str, Any]) -> None:
    """One `CONTAINERS {json}` line on the real stderr (in the CI log, from xdist workers too)
    and .pytest_cache/containers/<test>.json, as the drills report theirs."""
    record = {"kind": kind, "test": request.node.nodeid, **figures}
    request.node.user_properties.append((kind, json.dumps(figures, sort_keys=True)))
    FIGURES_DIR.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
    (FIGURES_DIR / f"{name}.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        sys.stderr.write(f"\nCONTAINERS {json.dumps(record, sort_keys=True)}\n")
        sys.stderr.flush()


def fresh_dir(parent: Path, prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
