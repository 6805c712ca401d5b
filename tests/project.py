"""Generated projects for the matrix: rendered once per combination (per xdist worker), with a
virtualenv synced on demand, and a gunicorn boot helper."""

from __future__ import annotations

import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from pytest_copier import CopierFixture

from .helpers import UV, Combo, python_for, render, run

_WORKDIR = Path(tempfile.mkdtemp(prefix="tpl-matrix-"))


@dataclass
class Project:
    combo: Combo
    path: Path
    # uv's resolution: "highest" (what a new project gets), or "lowest-direct" (every direct
    # dependency at the floor pyproject.toml declares).
    resolution: str = "highest"
    synced: bool = False
    _sync_error: str | None = field(default=None, repr=False)

    @property
    def bin(self) -> Path:
        return self.path / ".venv" / "bin"

    def sync(self) -> None:
        """`uv sync` with the combination's Python and the project's resolution (once); raises
        with uv's output on failure."""
        if self._sync_error:
            raise AssertionError(self._sync_error)
        if self.synced:
            return
        if not UV.exists():
            raise AssertionError(f"{UV} missing: run `bash scripts/test`, which installs uv")
        proc = run(
            [
                str(UV),
                "sync",
                "--resolution",
                self.resolution,
                "--python",
                str(python_for(self.combo.python_version)),
            ],
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


def project_for(copier: CopierFixture, combo: Combo, resolution: str = "highest") -> Project:
    key = combo.id if resolution == "highest" else f"{combo.id}-{resolution}"
    if key not in _projects:
        path = render(copier, _WORKDIR / key, combo.answers)
        _projects[key] = Project(combo, path, resolution)
    return _projects[key]


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
