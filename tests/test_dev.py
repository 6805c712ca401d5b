"""`make dev`: the generated project's development server reloads changed code."""

from __future__ import annotations

import re
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
            # Written again each time: the reloader's first look at the file (in a thread of
            # the worker, unseen from here) may come after a single write, which it would then
            # take for the file as it was.
            module.write_text(APP.format(package=package, answer="after"))
            time.sleep(0.2)


def _answer(svc: Service, path: str) -> object:
    """The route's answer; None while no worker serves (the old one stopping, the new starting)."""
    try:
        response = svc.get(path, timeout=5)
    except OSError:
        return None
    return response.json() if response.status == 200 else None
