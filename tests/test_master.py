"""The gunicorn master of a generated service, as an operator meets it: what becomes of its
workers when it is gone."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from pytest_copier import CopierFixture

from .helpers import COMBOS
from .project import Project, project_for
from .services import children_of, serve

COMBO = next(c for c in COMBOS if not (c.postgres or c.redis or c.sentry))


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
        assert not children_of(svc.process.pid)


def _running(pid: int) -> bool:
    """Whether pid is a process that has not exited (reparented, nobody reaps it: a zombie
    counts as exited)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"
