"""Fixtures of the template's suite: a hermetic environment, and real servers shared per session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from plumbum import local
from pytest_copier import CopierFixture
from pytest_gitconfig import GitConfig

from .servers import Postgres, Redis, postgres_server, redis_server

# pytest-copier renders from a scratch repository holding a copy of these (its copier_template
# fixture): the template and what copier.yml reads, never the suite, the bench or virtualenvs.
TEMPLATE_PATHS = ["copier.yml", "template", "hooks", "includes"]


@pytest.fixture(scope="session")
def copier_template_paths() -> list[str]:
    return TEMPLATE_PATHS


@pytest.fixture(scope="session")
def default_git_user_name() -> str:
    return "Template Tests"


@pytest.fixture(scope="session")
def default_git_user_email() -> str:
    return "tests@example.com"


@pytest.fixture(scope="session")
def set_default_gitconfig() -> dict[str, str]:
    return {"safe.directory": "*"}


@pytest.fixture(scope="session", autouse=True)
def hermetic_env(
    tmp_path_factory: pytest.TempPathFactory,
    sessionpatch: pytest.MonkeyPatch,
    default_gitconfig: GitConfig,
) -> Iterator[None]:
    """No user Copier settings, no system git configuration, no Python downloads by uv. The
    git identity and global configuration are pytest-gitconfig's (a session file, through
    pytest-copier's default_gitconfig, which must run first: it clears GIT_* variables)."""
    home = tmp_path_factory.mktemp("home")
    settings = home / "copier-settings.yml"
    settings.write_text("{}\n")
    for name, value in {
        "COPIER_SETTINGS_PATH": str(settings),
        "GIT_CONFIG_NOSYSTEM": "1",
        "UV_PYTHON_DOWNLOADS": "never",
    }.items():
        sessionpatch.setenv(name, value)
        sessionpatch.setitem(local.env, name, value)  # Copier runs git through plumbum
    yield


@pytest.fixture(scope="session")
def copier_session(copier_template: Path, sessionpatch: pytest.MonkeyPatch) -> CopierFixture:
    """pytest-copier's `copier` fixture for session-scoped users: the per-combination
    renderings are shared by every module (tests/project.py, tests/deploy)."""
    return CopierFixture(template=copier_template, defaults={}, monkeypatch=sessionpatch)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    with postgres_server() as server:
        yield server


@pytest.fixture(scope="session")
def redis() -> Iterator[Redis]:
    with redis_server() as server:
        yield server


@pytest.fixture
def dst(tmp_path: Path) -> Path:
    return tmp_path / "project"
