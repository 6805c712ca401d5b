"""Every answer combination, generated and checked: tree, lint and types, its own tests, a boot.

Tests of one combination share one rendering (and virtualenv) and run on one xdist worker
(`--dist loadgroup`); ids name the answers, so a failing line re-runs as is with `-k`.
"""

from __future__ import annotations

import json
import re
import secrets
import signal
import tomllib
from pathlib import Path

import pytest
from pytest_copier import CopierFixture

from .helpers import ALL_ENABLED, COMBO_IDS, COMBOS, Combo, environment, free_port, started
from .project import Project, expected_workers, http_get, project_for
from .servers import Postgres, Redis
from .services import serve

# Our templates write `{{ name }}`; GitHub's `${{ x }}` and docker/metadata-action's
# `{{is_default_branch}}` are not ours.
LEFTOVER_JINJA = re.compile(r"(?<!\$)\{\{ |\{%|%\}|\{#|\.jinja\b")
# Words that only a feature's own files may contain.
FEATURE_WORDS = {
    "postgres": re.compile(r"postgres|sqlalchemy|alembic|asyncpg|database_url", re.IGNORECASE),
    "redis": re.compile(r"redis", re.IGNORECASE),
    "sentry": re.compile(r"sentry", re.IGNORECASE),
    "tracing": re.compile(r"opentelemetry|otel|tracing|trace_id|traceparent", re.IGNORECASE),
}
# FastAPI's own telemetry, turned off in every project (main.py): its option names the signals.
NATIVE_TELEMETRY_OFF = 'telemetry={"tracing": False, "metrics": False, "logs": False},'
FEATURE_FILES = {
    "postgres": ["alembic.ini", "migrations/env.py", "src/{pkg}/db.py", "src/{pkg}/models.py"],
    "redis": ["src/{pkg}/cache.py"],
    "sentry": ["src/{pkg}/sentry.py"],
    "tracing": ["src/{pkg}/tracing.py", "tests/test_tracing.py"],
}
DEPLOYMENT_FILES = {
    "docker": [
        "Dockerfile",
        ".dockerignore",
        "compose.yaml",
        "compose.build.yaml",
        "deploy/nginx/my-service.conf",
        "deploy/rollout.sh",
    ],
    "systemd": [
        "deploy/systemd/my-service.service",
        "deploy/systemd/my-service.socket",
        "deploy/nginx/my-service.conf",
    ],
    "kubernetes": ["Dockerfile", ".dockerignore", "deploy/kubernetes/kustomization.yaml"],
}
COMMON_FILES = [
    ".copier-answers.yml",
    ".env.example",
    ".env",
    ".gitignore",
    ".pre-commit-config.yaml",
    ".python-version",
    "Makefile",
    "README.md",
    "pyproject.toml",
    "gunicorn.conf.py",
    "src/{pkg}/__init__.py",
    "src/{pkg}/main.py",
    "src/{pkg}/settings.py",
    "src/{pkg}/logs.py",
    "src/{pkg}/middleware.py",
    "src/{pkg}/health.py",
    "src/{pkg}/api.py",
    "tests/conftest.py",
    "deploy/README.md",
    ".github/workflows/ci.yml",
]


def over(combos: list[Combo]) -> pytest.MarkDecorator:
    """Parametrized by these combinations, each test on the xdist worker of its combination."""
    return pytest.mark.parametrize(
        "combo", [pytest.param(c, id=c.id, marks=pytest.mark.xdist_group(c.id)) for c in combos]
    )


matrix = over(COMBOS)


def _files(project: Project) -> dict[str, str]:
    out = {}
    for path in project.path.rglob("*"):
        rel = path.relative_to(project.path).as_posix()
        # What other tests of the same project leave: its virtualenv and lock (`uv sync`, in
        # whatever order the tests run), servers' logs, the tools' caches.
        skipped = (
            ".venv/",
            "uv.lock",
            ".git/",
            "gunicorn-",
            ".mypy_cache",
            ".ruff_cache",
            ".pytest_cache",
        )
        if path.is_file() and not rel.startswith(skipped) and "__pycache__" not in rel:
            out[rel] = path.read_text(errors="replace")
    return out


@pytest.mark.generate
@matrix
def test_tree_matches_answers(copier_session: CopierFixture, combo: Combo) -> None:
    project = project_for(copier_session, combo)
    files = _files(project)
    pkg = "my_service"
    expected = [f.format(pkg=pkg) for f in COMMON_FILES + DEPLOYMENT_FILES[combo.deployment]]
    for feature, names in FEATURE_FILES.items():
        for name in names:
            if getattr(combo, feature):
                expected.append(name.format(pkg=pkg))
            else:
                assert name.format(pkg=pkg) not in files, f"{name} present without {feature}"
    own = set(DEPLOYMENT_FILES[combo.deployment])
    for other, names in DEPLOYMENT_FILES.items():
        if other != combo.deployment:
            foreign = (set(names) - own) & set(files)
            assert not foreign, f"{other} files in a {combo.deployment} project: {foreign}"
    missing = [name for name in expected if name not in files]
    assert not missing, f"missing files: {missing}"

    for rel, text in files.items():
        if rel.endswith(".mako"):
            continue  # Alembic's own template language
        match = LEFTOVER_JINJA.search(text)
        assert match is None, f"leftover template syntax {match.group()!r} in {rel}"
        for feature, words in FEATURE_WORDS.items():
            if not getattr(combo, feature) and rel != ".copier-answers.yml":
                found = words.search(text.replace(NATIVE_TELEMETRY_OFF, ""))
                assert found is None, f"{rel} mentions disabled {feature}: {found.group()!r}"

    assert (project.path / ".python-version").read_text().strip() == combo.python_version


@pytest.mark.generate
@over([c for c in COMBOS if c.tracing])
def test_readme_names_every_otel_variable_the_service_reads(
    copier_session: CopierFixture, combo: Combo
) -> None:
    """The generated README's tracing section names each OTEL_* variable that tracing.py reads by
    name (e.g. the CA file of an https:// collector, checked at start), so an operator learns it
    exists, and where it goes in the deployment, without reading the code."""
    project = project_for(copier_session, combo)
    read = set(
        re.findall(r'"(OTEL_[A-Z_]+)"', (project.path / "src/my_service/tracing.py").read_text())
    )
    assert "OTEL_EXPORTER_OTLP_CERTIFICATE" in read, (
        "the variables are no longer named in tracing.py"
    )
    readme = (project.path / "README.md").read_text()
    missing = sorted(name for name in read if f"`{name}" not in readme)
    assert not missing, f"README.md does not name {missing}"


@pytest.mark.lint
@matrix
def test_ruff_and_mypy_strict(copier_session: CopierFixture, combo: Combo) -> None:
    project = project_for(copier_session, combo)
    project.tool("ruff", "check", "--no-cache", ".")
    project.tool("ruff", "format", "--check", "--no-cache", ".")
    project.tool("mypy", "--strict")


@pytest.mark.project
@matrix
def test_generated_test_suite_passes(
    copier_session: CopierFixture, combo: Combo, postgres: Postgres, redis: Redis
) -> None:
    project = project_for(copier_session, combo)
    if combo.sentry:
        # Half the matrix leaves TEST_* unset: the project starts its own throwaway servers.
        env = {"TEST_DATABASE_URL": "", "TEST_REDIS_URL": ""}
    else:
        env = {
            "TEST_DATABASE_URL": postgres.url("postgres"),
            "TEST_REDIS_URL": redis.url(COMBO_IDS.index(combo.id) + 1),
        }
    passes_its_tests(project, env)


def passes_its_tests(project: Project, env: dict[str, str]) -> None:
    """The project's own tests pass, none skipped, as in its CI on a fresh checkout: no .env
    (it is git-ignored), only the TEST_* variables in `env`."""
    dotenv = project.path / ".env"
    hidden = dotenv.rename(project.path / ".env.hidden-for-ci")
    try:
        output = project.tool("pytest", "-q", "-p", "no:cacheprovider", env=env)
    finally:
        hidden.rename(dotenv)
    assert re.search(r"\d+ passed", output), output
    assert "skipped" not in output, output


@pytest.mark.project
@over([COMBOS[0], ALL_ENABLED["docker"]])  # no feature at all; every feature
def test_fastapi_native_telemetry_is_off(copier_session: CopierFixture, combo: Combo) -> None:
    """The service's metrics, logs and spans are its own (main.py): with OpenTelemetry providers
    configured globally, as a distribution or an operator's injection does, FastAPI's native
    telemetry asks none of them for anything (on, it would record a second server span, request
    metrics and log records, and it looks for a provider on every request)."""
    project = project_for(copier_session, combo)
    probe = Path(__file__).with_name("native_telemetry_probe.py")
    out = project.tool("python", str(probe), "my_service")
    assert json.loads(out.splitlines()[-1]) == []


# The floors' check: every feature, on the newest Python (the oldest releases of a library may
# have no wheel for it). Its own xdist group: its rendering and virtualenv are its own.
FLOORS = ALL_ENABLED["kubernetes"]
FLOOR_RE = re.compile(r"([A-Za-z0-9_.-]+)(?:\[[a-z,]+\])?>=([0-9][0-9a-z.]*)")


def _release(version: str) -> tuple[tuple[int, ...], str]:
    """The release without trailing zeros (0.4 and 0.4.0 alike) and what follows it (b2)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)*)(.*)", version)
    assert match, version
    numbers = [int(part) for part in match[1].split(".")]
    while len(numbers) > 1 and numbers[-1] == 0:
        numbers.pop()
    return tuple(numbers), match[2]


@pytest.mark.project
@pytest.mark.parametrize(
    "combo",
    [pytest.param(FLOORS, id=f"{FLOORS.id}-floors", marks=pytest.mark.xdist_group("floors"))],
)
def test_passes_at_the_dependency_floors(
    copier_session: CopierFixture, combo: Combo, postgres: Postgres, redis: Redis
) -> None:
    """Each direct dependency (the dev group's too) at the lower bound pyproject.toml declares,
    as uv's lowest-direct resolution installs them and as a user's other constraints may: the
    project is lint- and type-clean, its tests pass and it boots under gunicorn, ready."""
    project = project_for(copier_session, combo, resolution="lowest-direct")
    pyproject = tomllib.loads((project.path / "pyproject.toml").read_text())
    declared = [*pyproject["project"]["dependencies"], *pyproject["dependency-groups"]["dev"]]
    floors = {}
    for requirement in declared:
        match = FLOOR_RE.fullmatch(requirement)
        assert match, f"{requirement!r}: not a plain lower bound, which this check reads"
        floors[match[1]] = match[2]
    project.sync()
    installed = json.loads(
        project.tool(
            "python",
            "-c",
            "import importlib.metadata as m, json, sys;"
            "print(json.dumps({n: m.version(n) for n in sys.argv[1:]}))",
            *floors,
        )
    )
    # A floor uv cannot install (no wheel for the Python, a conflict) it silently raises.
    above = {
        name: (floor, installed[name])
        for name, floor in floors.items()
        if _release(installed[name]) != _release(floor)
    }
    assert not above, f"installed above their floors: {above}"

    project.tool("ruff", "check", "--no-cache", ".")
    project.tool("ruff", "format", "--check", "--no-cache", ".")
    project.tool("mypy", "--strict")

    passes_its_tests(
        project, {"TEST_DATABASE_URL": postgres.url("postgres"), "TEST_REDIS_URL": redis.url(61)}
    )

    env_boot: dict[str, str | None] = {
        "ENVIRONMENT": "production",
        "SECRET_KEY": secrets.token_urlsafe(48),
        "LOG_FORMAT": None,
        "WEB_CONCURRENCY": None,
        "DATABASE_URL": postgres.url("postgres"),
        "REDIS_URL": redis.url(63),
    }
    with serve(project, env_boot) as server:
        status, _, body = http_get(server.base_url + "/health/ready")
        assert status == 200, body
        assert json.loads(body)["checks"] == {"postgres": "ok", "redis": "ok"}
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=40) == 0


@pytest.mark.boot
@matrix
def test_boots_under_gunicorn(
    copier_session: CopierFixture, combo: Combo, postgres: Postgres, redis: Redis
) -> None:
    project = project_for(copier_session, combo)
    env: dict[str, str | None] = {
        "ENVIRONMENT": "production",
        "SECRET_KEY": secrets.token_urlsafe(48),
        "LOG_FORMAT": None,
        "WEB_CONCURRENCY": None,
    }
    if combo.postgres:
        env["DATABASE_URL"] = postgres.url("postgres")
    if combo.redis:
        env["REDIS_URL"] = redis.url(COMBO_IDS.index(combo.id) + 20)
    # Half the matrix binds with --bind on the command line, half through GUNICORN_CMD_ARGS.
    bind_via = "cli" if COMBO_IDS.index(combo.id) % 2 else "env"
    with serve(project, env, bind_via=bind_via) as server:
        status, headers, body = http_get(server.base_url + "/health/ready")
        assert status == 200, body
        status, headers, _ = http_get(
            server.base_url + "/health/live", headers={"X-Request-ID": f"boot-{combo.id}"}
        )
        assert status == 200
        assert headers["x-request-id"] == f"boot-{combo.id}"
        # Production hides the API docs.
        assert http_get(server.base_url + "/docs")[0] == 404
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=40) == 0

    lines = server.log_lines()  # every line is JSON
    access = [
        line
        for line in lines
        if line.get("event") == "request" and line.get("request_id") == f"boot-{combo.id}"
    ]
    assert len(access) == 1, access
    assert access[0]["path"] == "/health/live"
    assert access[0]["status"] == 200
    booted = [line for line in lines if str(line.get("event", "")).startswith("Booting worker")]
    assert len(booted) == expected_workers(combo)


@pytest.mark.boot
@matrix
def test_refuses_to_start_with_insecure_or_missing_settings(
    copier_session: CopierFixture, combo: Combo
) -> None:
    project = project_for(copier_session, combo)
    log_path = project.path / "refused.log"
    env: dict[str, str | None] = {"ENVIRONMENT": "production", "SECRET_KEY": "change-me-secret-key"}
    if combo.postgres:
        env["DATABASE_URL"] = "mysql://nope"
    project.sync()
    cmd = [str(project.bin / "gunicorn"), "-c", "gunicorn.conf.py"]
    cmd += ["--bind", f"127.0.0.1:{free_port()}"]
    with started(cmd, project.path, environment(env), log_path) as process:
        assert process.wait(timeout=60) != 0
    output = log_path.read_text()
    assert "invalid settings" in output
    assert "SECRET_KEY: must be a random value" in output
    if combo.postgres:
        assert "DATABASE_URL: must start with postgresql://" in output
    assert "Traceback" not in output
    assert "Booting worker" not in output
