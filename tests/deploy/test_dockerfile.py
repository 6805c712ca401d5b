"""The Dockerfile: hadolint, its structure, the .dockerignore through Docker's own matching rules,
and the HEALTHCHECK's command against a local server answering every kind of status."""

from __future__ import annotations

import contextlib
import http.server
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from docker.utils.build import exclude_paths

from ..helpers import Combo, free_port, python_for
from .support import (
    DOCKER,
    IMAGE,
    Generated,
    _passed,
    check_file,
    dockerfile_instructions,
    healthcheck_command,
    params,
    run_healthcheck,
    tool,
)

pytestmark = pytest.mark.deploy


VENV_DIGEST = "tar --sort=name -cf - -C /app .venv | sha256sum > /app/venv.sha256"
VENV_MOUNT = "--mount=type=bind,from=dependencies,source=/app/.venv,target=/mnt/venv"


def check_hadolint(dockerfile: Path) -> None:
    check_file([tool("hadolint"), "--no-color"], dockerfile)


@pytest.mark.parametrize("combo", params(IMAGE))
def test_dockerfile_hadolint(generated: Callable[[Combo], Generated], combo: Combo) -> None:
    check_hadolint(generated(combo).path / "Dockerfile")


@pytest.mark.parametrize("combo", params(IMAGE))
def test_dockerfile_structure(generated: Callable[[Combo], Generated], combo: Combo) -> None:
    """Multi-stage with uv: the dependencies in their own locked stage and layer (extension
    modules stripped), the service in a stage of its own; a numeric non-root user; only the
    virtualenv and run-time files in the final stage, the service's own files last (a change to
    the code ships one small layer); gunicorn in exec form."""
    project = generated(combo)
    instructions = dockerfile_instructions(project.read("Dockerfile"))
    froms = [i for i, (ins, _) in enumerate(instructions) if ins == "FROM"]
    stages = [instructions[i][1].split()[-1] for i in froms]
    assert stages == ["uv", "build", "dependencies", "service", "runtime"], stages
    runtime = instructions[froms[-1] :]
    # Both build stages start from the common one, whose layers are made once: two copies of
    # the same steps made buildah's cache pick either copy on a rebuild, and miss.
    assert [instructions[i][1] for i in froms[2:4]] == ["build AS dependencies", "build AS service"]
    dependencies_stage = instructions[froms[2] : froms[3]]
    dependencies = " ".join(a for i, a in dependencies_stage if i == "RUN")
    assert "uv sync --locked --no-dev --no-install-project" in dependencies
    # The lock file is copied (podman's cache keys a COPY by content, a bind-mounted file not at
    # all), before the step that installs from it.
    copied = [
        n
        for n, (i, a) in enumerate(dependencies_stage)
        if (i, a) == ("COPY", "pyproject.toml uv.lock ./")
    ]
    syncs = [n for n, (i, a) in enumerate(dependencies_stage) if "uv sync" in a]
    assert copied and syncs and copied[0] < syncs[0], dependencies_stage
    assert "strip --strip-unneeded" in dependencies
    # The stage's last command writes the digest of the virtualenv as it is left (after strip
    # and the deletions), the key of the runtime stage's copy of it.
    assert " ".join(dependencies.split()).endswith(f"&& {VENV_DIGEST}"), dependencies
    service = " ".join(a for i, a in instructions[froms[3] : froms[4]] if i == "RUN")
    assert "uv pip install --no-deps --target /service ." in service
    # uv is mounted from its image where it runs, never copied into a layer.
    runs_uv = [a for i, a in instructions if i == "RUN" and re.search(r"\buv (sync|pip) ", a)]
    assert runs_uv and all("--mount=from=uv,source=/uv," in a for a in runs_uv), runs_uv
    assert not [a for i, a in instructions if i == "COPY" and "--from=uv" in a]
    assert any("UV_COMPILE_BYTECODE=1" in a for i, a in instructions if i == "ENV")
    # The runtime stage: no uv, no build tools, no source tree.
    runtime_text = " ".join(a for _, a in runtime)
    for absent in ("uv sync", "apt-get", "build-essential", "gcc", "COPY src", "--from=uv"):
        assert absent not in runtime_text
    # The virtualenv reaches the runtime stage by a RUN copying it from the dependencies stage
    # mounted (podman hashes every file of a COPY --from at each build to key it), as root,
    # right after a COPY of its digest (a RUN's cache is keyed by the layer below, not by what
    # it mounts): not one build reuses a copy of another virtualenv.
    venv_copy = ("COPY", "--from=dependencies /app/venv.sha256 /app/.venv/")
    venv_run = ["RUN", VENV_MOUNT, "cp", "-a", "/mnt/venv/.", "/app/.venv/"]
    at = runtime.index(venv_copy)
    assert [runtime[at + 1][0], *runtime[at + 1][1].split()] == venv_run, runtime[at : at + 2]
    assert at + 1 < next(n for n, (i, _) in enumerate(runtime) if i == "USER"), runtime
    assert len([a for i, a in runtime if i == "RUN" and "--mount" in a]) == 1, runtime
    copies = [a for i, a in runtime if i == "COPY" and (i, a) != venv_copy]
    expected = ["gunicorn.conf.py ./"]
    if combo.postgres:
        expected += ["alembic.ini ./", "migrations ./migrations"]
    site_packages = f"/app/.venv/lib/python{combo.python_version}/site-packages/"
    expected.append(f"--from=service /service {site_packages}")
    assert copies == expected
    assert runtime[-1] == ("COPY", expected[-1]), "the service's files are not the last layer"
    users = [a for i, a in runtime if i == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*:[1-9]\d*", users[-1]), users
    assert ("CMD", '["gunicorn", "-c", "gunicorn.conf.py"]') in runtime


def test_hadolint_fails_on_a_broken_dockerfile(
    generated: Callable[[Combo], Generated], tmp_path: Path
) -> None:
    text = generated(DOCKER[0]).read("Dockerfile")
    broken = tmp_path / "Dockerfile"
    broken.write_text(text.replace("USER 10001:10001", "USER root"))
    assert broken.read_text() != text
    with pytest.raises(AssertionError, match="DL3002"):
        check_hadolint(broken)


def context_files(project: Path) -> set[str]:
    """The build context `docker build` would send, by Docker's .dockerignore rules."""
    patterns = (project / ".dockerignore").read_text().splitlines()
    return set(exclude_paths(str(project), patterns))


def check_dockerignore(project: Generated) -> None:
    # What a developer's checkout holds besides the generated files.
    for junk in (
        ".env",
        ".env.local",
        ".git/config",
        ".venv/bin/python",
        "tests/test_x.py",
        f"src/{project.package}/__pycache__/main.cpython-312.pyc",
        ".pytest_cache/v",
        ".mypy_cache/x.json",
        ".ruff_cache/x",
        "htmlcov/index.html",
        ".coverage",
        "dist/x.whl",
    ):
        (project.path / junk).parent.mkdir(parents=True, exist_ok=True)
        (project.path / junk).write_text("junk\n")
    sent = context_files(project.path)
    leaked = sorted(
        p
        for p in sent
        if re.match(
            r"(\.env|\.git/|\.venv/|tests/|\.pytest_cache|\.mypy_cache|\.ruff_cache|htmlcov|"
            r"\.coverage|dist/)|.*__pycache__",
            p,
        )
    )
    assert not leaked, f"the build context would include {leaked}"
    # Everything the Dockerfile copies from the context is there.
    needed = {
        "pyproject.toml",
        "uv.lock",
        "README.md",
        "gunicorn.conf.py",
        f"src/{project.package}/main.py",
    }
    if project.combo.postgres:
        needed |= {"alembic.ini", "migrations/env.py"}
    (project.path / "uv.lock").touch()  # created by `uv sync`, committed by the user
    missing = needed - context_files(project.path)
    assert not missing, f"the build context lacks {missing}"


@pytest.mark.parametrize("combo", params(IMAGE))
def test_dockerignore(
    generated: Callable[[Combo], Generated], combo: Combo, tmp_path: Path
) -> None:
    """Secrets, VCS data, virtualenvs, caches and tests never reach the image."""
    check_dockerignore(generated(combo).copy(tmp_path / "project"))


def test_dockerignore_check_fails_when_env_is_not_ignored(
    generated: Callable[[Combo], Generated], tmp_path: Path
) -> None:
    project = generated(DOCKER[0]).copy(tmp_path / "project")
    ignore = project.path / ".dockerignore"
    ignore.write_text(
        "\n".join(
            line
            for line in ignore.read_text().splitlines()
            if not line.startswith((".env", "**/.env"))
        )
    )
    with pytest.raises(AssertionError, match=r"\.env"):
        check_dockerignore(project)


class _Answer(http.server.BaseHTTPRequestHandler):
    """Answers /health/live with the server's current status; /ok with 200."""

    def do_GET(self) -> None:
        status = 200 if self.path == "/ok" else self.server.status  # type: ignore[attr-defined]
        self.send_response(status)
        if 300 <= status < 400:
            self.send_header("Location", "/ok")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def answering() -> Iterator[http.server.ThreadingHTTPServer]:
    """A local HTTP server whose `status` attribute is what /health/live answers."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answer)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.mark.parametrize("combo", params(IMAGE))
def test_healthcheck_fails_on_anything_but_2xx(
    generated: Callable[[Combo], Generated], combo: Combo
) -> None:
    """The image's HEALTHCHECK (compose.yaml uses the same command) passes on 200 and 204, and
    fails on redirects (even to a 200), 4xx, 5xx and when nothing listens, with the image's
    Python version."""
    project = generated(combo)
    command = healthcheck_command(project.read("Dockerfile"))
    if combo.deployment == "docker":
        compose = yaml.safe_load(project.read("compose.yaml"))
        assert compose["services"]["app"]["healthcheck"]["test"] == ["CMD", *command]
    python = python_for(combo.python_version)
    key = (str(python), *command)
    if key in _passed:  # the same command already proven with this Python
        return
    results = {}
    with answering() as server:
        for status in (200, 204, 301, 302, 404, 500, 503):
            server.status = status  # type: ignore[attr-defined]
            results[status] = run_healthcheck(command, python, server.server_address[1]).returncode
    results[0] = run_healthcheck(command, python, free_port()).returncode  # nothing listening
    assert {s: rc == 0 for s, rc in results.items()} == {
        200: True,
        204: True,
        301: False,
        302: False,
        404: False,
        500: False,
        503: False,
        0: False,
    }
    _passed.add(key)
