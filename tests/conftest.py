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


# ---------------------------------------------------------------- time per tier

TIERS = ("generate", "lint", "project", "boot", "deploy", "update", "drills", "containers")
_tier_seconds = dict.fromkeys(TIERS, 0.0)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Setup, call and teardown of every test, added to each tier it is marked with (under
    xdist the reports reach the controller, so this sees every worker's tests)."""
    # Keywords include directory names: the containers modules live in tests/deploy/ and are
    # counted as containers only.
    tiers = ["containers"] if "containers" in report.keywords else TIERS
    for tier in tiers:
        if tier in report.keywords:
            _tier_seconds[tier] += report.duration


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The time each tier took, summed over its tests: with -n 2 the wall-clock time is about
    half of the sum (the README's test table quotes these)."""
    spent = {tier: seconds for tier, seconds in _tier_seconds.items() if seconds}
    if spent:
        terminalreporter.section("time per tier (sum of test durations)")
        for tier, seconds in spent.items():
            terminalreporter.write_line(f"{tier:>9}: {seconds / 60:5.1f} min")
