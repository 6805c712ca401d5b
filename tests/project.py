"""Generated projects for the matrix: rendered once per combination (per xdist worker), with a
virtualenv synced on demand, and a gunicorn boot helper."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .helpers import UV, Combo, free_port, json_lines, python_for, render, run, stop

_WORKDIR = Path(tempfile.mkdtemp(prefix="tpl-matrix-"))


@dataclass
class Project:
    combo: Combo
    path: Path
    synced: bool = False
    _sync_error: str | None = field(default=None, repr=False)

    @property
    def bin(self) -> Path:
        return self.path / ".venv" / "bin"

    def sync(self) -> None:
        """`uv sync` with the combination's Python (once); raises with uv's output on failure."""
        if self._sync_error:
            raise AssertionError(self._sync_error)
        if self.synced:
            return
        if not UV.exists():
            raise AssertionError(f"{UV} missing: run `bash scripts/test`, which installs uv")
        proc = run(
            [str(UV), "sync", "--python", str(python_for(self.combo.python_version))],
            cwd=self.path,
            check=False,
        )
        if proc.returncode != 0:
            self._sync_error = f"uv sync failed in {self.path}:\n{proc.stdout}"
            raise AssertionError(self._sync_error)
        self.synced = True

    def tool(self, *args: str, env: dict[str, str] | None = None, timeout: float = 600) -> str:
        self.sync()
        return run(
            [str(self.bin / args[0]), *args[1:]],
            cwd=self.path,
            env={**os.environ, **(env or {})},
            timeout=timeout,
        ).stdout


_projects: dict[str, Project] = {}


def project_for(combo: Combo) -> Project:
    if combo.id not in _projects:
        path = render(_WORKDIR / combo.id, combo.answers)
        _projects[combo.id] = Project(combo, path)
    return _projects[combo.id]


def expected_workers(combo: Combo) -> int:
    if combo.workers:
        return combo.workers
    return min(2 * len(os.sched_getaffinity(0)) + 1, 16)


def http_get(
    url: str, headers: dict[str, str] | None = None, timeout: float = 5
) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


@dataclass
class Running:
    process: subprocess.Popen[bytes]
    base_url: str
    log_path: Path

    def log_lines(self) -> list[dict[str, object]]:
        lines = []
        for raw in json_lines(self.log_path):
            lines.append(json.loads(raw))  # every line must be JSON: fails loudly if not
        return lines


def start_gunicorn(
    project: Project, env: dict[str, str | None], args: list[str], log_path: Path
) -> subprocess.Popen[bytes]:
    """`gunicorn -c gunicorn.conf.py [args]` in the project; env adds to the environment and a
    None value removes the variable."""
    project.sync()
    full_env = dict(os.environ)
    for key, value in env.items():
        if value is None:
            full_env.pop(key, None)
        else:
            full_env[key] = value
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [str(project.bin / "gunicorn"), "-c", "gunicorn.conf.py", *args],
            cwd=project.path,
            env=full_env,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )


@contextlib.contextmanager
def boot(
    project: Project,
    env: dict[str, str | None],
    timeout: float = 90,
    bind_via: str = "env",
    args: tuple[str, ...] = (),
) -> Iterator[Running]:
    """Start the service on a free port, wait for /health/live; stop it (SIGTERM) afterwards.

    bind_via: "env" passes --bind in GUNICORN_CMD_ARGS, "cli" on the command line (both must
    win over the config's bind)."""
    port = free_port()
    log_path = project.path / f"gunicorn-{port}.log"
    bind = f"--bind 127.0.0.1:{port}"
    if bind_via == "env":
        env = {**env, "GUNICORN_CMD_ARGS": bind}
    else:
        args = (*bind.split(), *args)
    process = start_gunicorn(project, env, list(args), log_path)
    running = Running(process, f"http://127.0.0.1:{port}", log_path)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                output = log_path.read_text()
                raise AssertionError(f"gunicorn exited {process.returncode}:\n{output}")
            try:
                if http_get(running.base_url + "/health/live", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                output = log_path.read_text()
                raise AssertionError(f"gunicorn did not answer in {timeout}s:\n{output}")
            time.sleep(0.2)
        yield running
    finally:
        stop(process, timeout=40)
