"""Restarts and deploys of the compose stack lose no request (issue 16): the all-features docker
project's stack, brought up as tests/deploy/test_compose_stack.py brings it up, under steady load
through the real nginx over HTTPS while the generated deploy/rollout.sh restarts the app (the same
tag), is refused a release that cannot start, and deploys a new one (another tag, built from
changed source); and that the same load tells: a deploy by `docker compose up -d`, as the guide
had it before, loses requests.

One more override than the stack test's: the app's health check every second. compose.yaml's
`start_interval: 1s` does that while a container starts, on Docker Engine 25 and later; Debian's
Engine (20.10) ignores it and checks every `interval` (30 s), which would make each rollout wait
30 s for the new container to be healthy."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from ..containers import standins
from ..containers.engines import Docker, Podman, _compose, _which
from ..drills_support import load_generator
from ..helpers import ALL_ENABLED, Combo
from .containers import MARKS, build, buildable, release_image, report, set_release
from .support import RELEASE, Generated
from .test_compose_stack import NAME, call, client, compose_logs, override, up

pytestmark = MARKS

# The next release's tag, as CI would push it for another commit.
NEXT = "sha-" + "fedcba9876543210" * 2 + "fedcba98"
LOAD_CONNECTIONS = 8


def app_containers(docker: Docker, project: Path, files: list[Path]) -> list[str]:
    out = docker.compose(project, files, NAME, "ps", "--all", "--quiet", "app").stdout
    return sorted(out.split())


@contextlib.contextmanager
def load(
    port: int, domain: str, certificate: Path, workdir: Path
) -> Iterator[Callable[[], dict[str, Any]]]:
    """tests/drills_load.py over HTTPS to nginx's published port, kept-alive connections on
    /health/live (not rate limited), until the yielded function stops it and returns its
    figures. A request lost on a reused connection before any byte of an answer (nginx closes
    its idle client connections when it reloads) is sent again once, as browsers and HTTP
    clients do, and counted apart (lost_in_flight, retried_ok)."""
    with load_generator(
        workdir,
        *("--port", str(port), "--host", domain, "--path", "/health/live"),
        *("--tls-ca", str(certificate / "fullchain.pem")),
        *("--seconds", "300", "--connections", str(LOAD_CONNECTIONS)),
    ) as finish:
        yield finish


def set_tag(project: Generated, tag: str) -> None:
    """The guide's step: APP_TAG in .env set to the release to run."""
    env = project.path / ".env"
    text, found = re.subn(r"(?m)^APP_TAG=.*$", f"APP_TAG={tag}", env.read_text())
    assert found == 1
    env.write_text(text)


def test_compose_rollout(
    request: pytest.FixtureRequest,
    generated: Callable[[Combo], Generated],
    podman: Podman,
    docker: Docker,
    certificates: Callable[[str], Path],
    tmp_path: Path,
) -> None:
    """Under steady load through nginx, deploy/rollout.sh restarts the app with the same tag,
    refuses a release whose container never gets healthy (the old one serves on), and deploys
    a new tag: not one request fails, the new version answers at the end, one app container is
    left each time and nginx's /etc/hosts is as Docker wrote it."""
    project = buildable(generated(ALL_ENABLED["docker"]), tmp_path / "project")
    set_release(project)
    first = release_image(project)
    build(podman, project, first)
    # The next release: changed source, its own tag (only the code's steps are rebuilt).
    init = project.path / "src" / project.package / "__init__.py"
    init.write_text(re.sub(r"(?m)^__version__ = .*$", '__version__ = "2.0.0"', init.read_text()))
    second = f"{first.rpartition(':')[0]}:{NEXT}"
    build(podman, project, second)
    services = yaml.safe_load(project.read("compose.yaml"))["services"]
    others = [services[name]["image"] for name in ("db", "redis", "nginx")]
    for name in others:
        standins.ensure(podman, standins.service_standin(name))
    docker.load(podman, first, second, *(standins.qualified(name) for name in others))

    certificate = certificates(project.domain)
    host_file, https_port = override(project, tmp_path, certificate)
    checks = tmp_path / "compose.healthcheck.yaml"
    checks.write_text("services:\n  app:\n    healthcheck:\n      interval: 1s\n")
    files = [project.path / "compose.yaml", host_file, checks]
    # The script runs `docker compose` as a user would: the CLI, the compose plugin (the one the
    # suite runs, linked where this daemon's CLI configuration looks for plugins), and the stack
    # named by compose's own variables.
    plugins = Path(docker.env["DOCKER_CONFIG"]) / "cli-plugins"
    plugins.mkdir(exist_ok=True)
    with contextlib.suppress(FileExistsError):
        (plugins / "docker-compose").symlink_to(_compose())
    env = {
        **docker.env,
        "PATH": f"{Path(_which('docker')).parent}{os.pathsep}{os.environ['PATH']}",
        "COMPOSE_FILE": os.pathsep.join(str(file) for file in files),
        "COMPOSE_PROJECT_NAME": NAME,
    }
    script = project.path / "deploy" / "rollout.sh"
    assert os.access(script, os.X_OK), "deploy/rollout.sh is executable"

    def version() -> str:
        with client(project, certificate, https_port) as http:
            answer = call(http, project, "GET", "/api/v1/info")
            assert answer.status_code == 200, answer.text
            return str(answer.json()["version"])

    def under_load(command: list[str]) -> tuple[subprocess.CompletedProcess[str], float, Any]:
        """command run under load (from a second before to a second after it)."""
        with load(https_port, project.domain, certificate, tmp_path) as finish:
            time.sleep(1)
            started = time.monotonic()
            proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
            took = time.monotonic() - started
            time.sleep(1)
            return proc, took, finish()

    def rollout(step: str, succeeds: bool) -> dict[str, Any]:
        """deploy/rollout.sh under load."""
        before = app_containers(docker, project.path, files)
        assert len(before) == 1, before
        proc, took, stats = under_load([str(script)])
        after = app_containers(docker, project.path, files)
        output = proc.stdout + proc.stderr
        sys.stderr.write(f"rollout.sh ({step}):\n{output}\n")
        if succeeds:
            assert proc.returncode == 0, output
            assert len(after) == 1 and after != before, (before, after, output)
            assert before[0] not in docker("ps", "--all", "--quiet", "--no-trunc").stdout
            # The old container drained and exited 0 (gunicorn's graceful stop).
            assert re.search(r" exited 0$", output, re.M), output
        else:
            assert proc.returncode == 1, output
            assert after == before, (before, after, output)
        hosts = docker.compose(
            project.path, files, NAME, "exec", "-T", "nginx", "cat", "/etc/hosts"
        ).stdout
        assert "# rollout" not in hosts, hosts
        figures = {
            "rollout_s": round(took, 1),
            "requests": stats["sent"],
            "failed": stats["failed"],
            "requests_per_second": stats["requests_per_second"],
            "lost_in_flight": sum(stats["lost_in_flight"].values()),
            "retried_ok": stats["retried_ok"],
            "max_latency_s": stats["max_latency_s"],
        }
        assert stats["failed"] == 0, (step, stats, output)
        assert stats["sent"] > 100, (step, stats)
        return figures

    figures: dict[str, Any] = {}
    try:
        figures["up_to_healthy_s"] = round(up(docker, project.path, files), 1)
        old_version = version()
        assert old_version != "2.0.0"
        # The rollout's `docker stop` waits as long as `compose stop` would: compose gave the
        # container its stop_grace_period.
        (container,) = app_containers(docker, project.path, files)
        grace = docker("inspect", "--format", "{{.Config.StopTimeout}}", container).stdout
        assert f"{int(grace)}s" == services["app"]["stop_grace_period"], grace

        figures["restart"] = rollout("restart", succeeds=True)
        assert version() == old_version

        # A release that cannot start: production refuses a placeholder SECRET_KEY, so its
        # container exits and restarts; the rollout removes it, the old one serves on.
        env_file = project.path / ".env"
        good = env_file.read_text()
        env_file.write_text(re.sub(r"(?m)^SECRET_KEY=.*$", "SECRET_KEY=change-me", good))
        figures["refused"] = rollout("refused", succeeds=False)
        env_file.write_text(good)
        assert version() == old_version

        set_tag(project, NEXT)
        figures["deploy"] = rollout("deploy", succeeds=True)
        assert version() == "2.0.0"

        # What the guide said before: a deploy (back to the first tag) by `docker compose up -d`,
        # which stops the app before its replacement serves and restarts nginx. It loses
        # requests: the load above tells a rollout that does from one that does not.
        set_tag(project, RELEASE)
        proc, took, stats = under_load(["docker", "compose", "up", "--detach"])
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert version() == old_version
        figures["compose_up"] = {
            "seconds": round(took, 1),
            "requests": stats["sent"],
            "failed": stats["failed"],
            "reasons": stats["reasons"],
        }
        assert stats["failed"] > 0, stats
    finally:
        logs = compose_logs(docker, project.path, files)
        docker.compose(project.path, files, NAME, "down", "--volumes", check=False)
    report(request, "compose-rollout", figures)
    assert "Traceback" not in logs, logs
