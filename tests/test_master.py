"""The gunicorn master of a generated service, as an operator and a developer meet it: what
becomes of its workers when it is gone, and `make dev` serving changed code."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest
from pytest_copier import CopierFixture

from .helpers import COMBOS
from .project import Project, project_for
from .services import Service, serve

COMBO = next(c for c in COMBOS if not (c.postgres or c.redis or c.sentry))

# A module of the test's own beside the project's (the project is shared, never edited): the
# project's application with one route more, whose answer the test changes.
APP = """
from {package}.main import create_app


def create():
    app = create_app()

    @app.get("/dev")
    async def dev() -> str:
        return "{answer}"

    return app
"""


@pytest.fixture(scope="module")
def project(copier_session: CopierFixture) -> Project:
    return project_for(copier_session, COMBO)


@pytest.mark.boot
@pytest.mark.xdist_group(COMBO.id)
def test_workers_end_when_the_master_is_killed(project: Project, tmp_path: Path) -> None:
    """The master SIGKILLed (as the kernel's out-of-memory killer may): its workers shut down
    instead of serving on as orphans, holding the ports and the old code. They check on their
    master every half worker timeout (2 s here)."""
    env = {"LOG_FORMAT": "json", "GUNICORN_CMD_ARGS": "--timeout 4 --workers 2"}
    with serve(project, env, tmp_path, bind_via="cli") as svc:
        workers = svc.wait_for_workers(2)
        os.kill(svc.process.pid, signal.SIGKILL)
        svc.process.wait()
        deadline = time.monotonic() + 30
        while alive := [pid for pid in workers if _running(pid)]:
            assert time.monotonic() < deadline, (alive, svc.log_path.read_text()[-3000:])
            time.sleep(0.2)
        assert "the master (pid" in svc.log_path.read_text()


def _running(pid: int) -> bool:
    """Whether pid is a process that has not exited (reparented, nobody reaps it: a zombie
    counts as exited)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.boot
@pytest.mark.xdist_group(COMBO.id)
def test_make_dev_serves_changed_code(project: Project, tmp_path: Path) -> None:
    """The Makefile's `dev` command (gunicorn --reload, one worker): a module changed on disk
    is served by a new worker. gunicorn's reloader alone left uvicorn's worker serving the old
    code (gunicorn.conf.py's worker_int stops it)."""
    makefile = (project.path / "Makefile").read_text()
    (dev,) = re.findall(r"^dev:.*\n\t(.*gunicorn -c gunicorn.conf.py .*)$", makefile, re.M)
    assert "--reload --workers 1" in dev, dev
    (package,) = [path.name for path in (project.path / "src").iterdir() if path.is_dir()]
    module = tmp_path / "app" / "dev_app.py"
    module.parent.mkdir()
    module.write_text(APP.format(package=package, answer="before"))
    env = {"ENVIRONMENT": "development", "LOG_FORMAT": None}
    args = ("--reload", "--workers", "1")
    with serve(
        project, env, tmp_path, app="dev_app:create()", extra_path=module.parent, args=args
    ) as svc:
        assert svc.get("/dev").json() == "before"
        deadline = time.monotonic() + 30
        while (answer := _answer(svc, "/dev")) != "after":
            assert time.monotonic() < deadline, (answer, svc.log_path.read_text()[-3000:])
            if answer == "before":
                # Saved (again) while the old code answers: the reloader, a thread of the worker,
                # takes its first look at the files at a moment unseen from here, and a file
                # saved before that look counts as unchanged. Never once the old worker has
                # stopped answering: the new one would be reloaded in turn.
                module.write_text(APP.format(package=package, answer="after"))
            time.sleep(0.2)


def _answer(svc: Service, path: str) -> object:
    """The route's answer; None while no worker serves (the old one stopping, the new starting)."""
    try:
        response = svc.get(path, timeout=5)
    except OSError:
        return None
    return response.json() if response.status == 200 else None
