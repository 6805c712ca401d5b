"""The backup and restore runbook of deploy/README.md ("Backups"), run as written against a real
PostgreSQL and the generated service: items created through the API, the guide's dump taken while
the service runs, its restore into a new database, its renaming, and the same items read back
through the API of a service started on the restored database.

The guide's commands run in bash as they are, with what only a server has replaced: `sudo -u
postgres` runs the command as this user, connected as the suite's `postgres` superuser (PGHOST,
PGPORT, PGUSER: what `sudo -u postgres` reaches through the local socket on a server); `docker
compose exec -T db CMD` runs CMD here, its standard input and output through pipes as `exec -T`
gives them (a dump written to a pipe has no data offsets, and pg_restore must then read it in
order); /var/backups/<slug> is a temporary directory; the database and its role are named for the
test. `systemctl`, `docker compose stop/start` and `curl` are the test's own: it stops and starts
the service itself, and checks that the guide stops it before the renaming and starts it after.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pytest_copier import CopierFixture

from ..helpers import ALL_ENABLED, Combo, run
from ..project import Project, project_for
from ..servers import Postgres, Redis
from ..services import Service, http_request, serve
from .test_guide import shell_blocks

pytestmark = [pytest.mark.deploy, pytest.mark.boot]

# Stand-ins for what a server has, defined before each of the guide's blocks.
STANDINS = r"""
set -euo pipefail
sudo() {
    if [ "$1" = -u ]; then
        [ "$2" = postgres ] || { echo "sudo -u $2: only postgres is expected" >&2; return 97; }
        shift 2
    fi
    "$@"
}
docker() {
    if [ "${1-} ${2-} ${3-} ${4-}" = "compose exec -T db" ]; then
        shift 4
        { cat || true; } | "$@" | cat
        return
    fi
    echo "docker $*" >> "$CALLS"
}
systemctl() { echo "systemctl $*" >> "$CALLS"; }
curl() { echo "curl $*" >> "$CALLS"; }
psql() { echo "psql $*" >> "$CALLS"; command psql "$@"; }
"""

ITEMS = [
    {"name": "first", "description": ""},
    {"name": "Zweite Sache", "description": "ünïcödé, 'quotes', \"double\", a\ttab\nand a line"},
    {"name": "x" * 100, "description": "y" * 1000},
]


def backup_section(guide: str) -> str:
    match = re.search(r"^## Backups\n(.*?)(?=^## |\Z)", guide, re.M | re.S)
    assert match, "the deploy guide has no Backups section"
    return match.group(1)


def runbook(project: Project, database: str, backups: Path) -> list[str]:
    """The Backups section's shell blocks (take, schedule, restore, switch), continuation lines
    joined, with the server's paths and names replaced by the test's."""
    answers = (project.path / ".copier-answers.yml").read_text()
    slug = re.search(r"^project_slug: (\S+)$", answers, re.M).group(1)
    package = re.search(r"^package_name: (\S+)$", answers, re.M).group(1)
    blocks = shell_blocks(backup_section((project.path / "deploy" / "README.md").read_text()))
    assert len(blocks) == 4, f"take, schedule, restore, switch: {len(blocks)} blocks"
    out = []
    for block in blocks:
        block = re.sub(r"[ \t]*\\\n\s*", " ", block)
        block = block.replace(f"cd /srv/{slug}\n", "")
        block = block.replace("-o postgres -g postgres ", "").replace('-o "$USER" ', "")
        block = block.replace(f"/var/backups/{slug}", str(backups))
        out.append(block.replace(package, database))
    return out


def bash(block: str, env: dict[str, str], cwd: Path) -> str:
    """A block of the guide after the stand-ins; its standard input is empty, as a terminal's
    would be to `docker compose exec -T` without a redirection."""
    proc = subprocess.run(
        ["bash", "-c", STANDINS + block],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"the guide's block exited {proc.returncode}:\n{block}\n{proc.stdout}{proc.stderr}"
        )
    return proc.stdout


def query(postgres: Postgres, database: str, sql: str) -> str:
    server = ["-h", postgres.host, "-p", str(postgres.port), "-U", postgres.user]
    proc = subprocess.run(
        [
            str(postgres.bindir / "psql"),
            *server,
            "-d",
            database,
            "-v",
            "ON_ERROR_STOP=1",
            "-Atc",
            sql,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return proc.stdout.strip()


def read_items(service: Service) -> list[dict[str, Any]]:
    response = http_request(service.port, "GET", "/api/v1/items?limit=100")
    assert response.status == 200, f"reading the items: {response.status} {response.body!r}"
    return list(response.json())


def create_item(service: Service, item: dict[str, str]) -> dict[str, Any]:
    body = json.dumps(item).encode()
    response = http_request(
        service.port, "POST", "/api/v1/items", {"Content-Type": "application/json"}, body
    )
    assert response.status == 201, f"creating an item: {response.status} {response.body!r}"
    return dict(response.json())


def backup_and_restore(
    project: Project,
    postgres: Postgres,
    redis: Redis,
    database: str,
    workdir: Path,
    superuser: bool,
    edit: Any = None,
) -> None:
    """The whole runbook on `database` (also its role's name). `edit` changes the guide's
    blocks first: a broken copy."""
    workdir.mkdir(parents=True, exist_ok=True)
    backups = workdir / "backups"
    blocks = runbook(project, database, backups)
    if edit:
        changed = [edit(block) for block in blocks]
        assert changed != blocks, "the broken copy changes nothing"
        blocks = changed
    take, schedule, restore, switch = blocks

    # The service's role and database, as the guide's step 4 (or the db container) makes them.
    attributes = "LOGIN SUPERUSER" if superuser else "LOGIN"
    postgres.psql(
        f'DO $$BEGIN CREATE ROLE "{database}" {attributes}; '
        "EXCEPTION WHEN duplicate_object THEN NULL; END$$"
    )
    for name in (database, f"{database}_restored", f"{database}_before_restore"):
        postgres.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    postgres.psql(f'CREATE DATABASE "{database}" OWNER "{database}"')
    url = f"postgresql://{database}@{postgres.host}:{postgres.port}/{database}"
    project.tool("alembic", "upgrade", "head", env={"DATABASE_URL": url})
    revision = query(postgres, database, "SELECT version_num FROM alembic_version")

    calls = workdir / "calls"
    shell_env = {
        **os.environ,
        "PATH": f"{postgres.bindir}:{os.environ['PATH']}",
        "PGHOST": postgres.host,
        "PGPORT": str(postgres.port),
        "PGUSER": postgres.user,
        "CALLS": str(calls),
    }
    service_env: dict[str, str | None] = {
        "ENVIRONMENT": "production",
        "SECRET_KEY": secrets.token_urlsafe(48),
        "LOG_FORMAT": None,
        "WEB_CONCURRENCY": "1",
        "DATABASE_URL": url,
        "REDIS_URL": redis.url(62),
        "SENTRY_DSN": "",
    }

    # Items through the API, the dump taken while the service runs, then one item more.
    with serve(project, service_env, log_dir=workdir) as service:
        created = [create_item(service, item) for item in ITEMS]
        before = read_items(service)
        assert before == created
        bash(take, shell_env, workdir)
        later = create_item(service, {"name": "after the dump"})
    (dump,) = backups.glob(f"{database}-*.dump")

    # The daily job runs the same dump, and removes dumps older than 14 days, only those.
    (cron,) = [line for line in schedule.splitlines() if re.match(r"\d+ \d+ \* \* \* ", line)]
    command = cron.split(" ", 6)[6].replace("\\%", "%")
    dump_line = next(line for line in take.splitlines() if "pg_dump" in line)
    assert dump_line.replace("sudo -u postgres ", "") in command, (dump_line, command)
    retention = command[command.index("find ") :]
    old, recent = backups / f"{database}-old.dump", backups / f"{database}-recent.dump"
    for path, age in ((old, "15 days ago"), (recent, "13 days ago")):
        path.touch()
        run(["touch", "-d", age, str(path)])
    run(["bash", "-euc", retention])  # as cron runs it: no stand-in needed
    assert not old.exists() and recent.exists() and dump.exists()
    recent.unlink()

    # Restored into a new database, checked, renamed into place while the service is stopped.
    calls.write_text("")
    output = bash(restore, shell_env, workdir)
    assert revision in output, f"the restore's check shows no schema revision:\n{output}"
    calls.write_text("")
    bash(switch, shell_env, workdir)
    order = calls.read_text().splitlines()
    stops = [i for i, call in enumerate(order) if re.search(r"\bstop\b", call)]
    starts = [i for i, call in enumerate(order) if re.search(r"\bstart\b", call)]
    renames = [i for i, call in enumerate(order) if call.startswith("psql")]
    assert stops and renames and starts, order
    assert max(stops) < min(renames) and max(renames) < min(starts), order
    assert query(postgres, f"{database}_before_restore", "SELECT count(*) FROM items") == "4"

    # The service on the restored database: the items as they were at the dump, and new ones
    # numbered after them (the sequences came back too).
    with serve(project, service_env, log_dir=workdir) as service:
        assert service.get("/health/ready").status == 200
        assert read_items(service) == before, "the restored items differ"
        again = create_item(service, {"name": "after the restore"})
        assert again["id"] == max(item["id"] for item in before) + 1 == later["id"]


@pytest.fixture
def project(copier_session: CopierFixture, request: pytest.FixtureRequest) -> Project:
    combo: Combo = request.param
    return project_for(copier_session, combo)


def cases(*deployments: str) -> list[Any]:
    return [
        pytest.param(c, id=c.id, marks=pytest.mark.xdist_group(c.id))
        for c in (ALL_ENABLED[d] for d in deployments)
    ]


@pytest.mark.parametrize("project", cases("systemd", "docker"), indirect=True)
def test_backup_restores_the_items(
    project: Project, postgres: Postgres, redis: Redis, tmp_path: Path
) -> None:
    """The guide's dump of a running service's database, restored by the guide's commands into
    a new database and renamed into place, gives the service the same items, and the next item
    the next id. Docker's role is a superuser, as the postgres image makes it."""
    deployment = project.combo.deployment
    backup_and_restore(
        project, postgres, redis, f"bk_{deployment}", tmp_path, superuser=deployment == "docker"
    )


@pytest.mark.parametrize("project", cases("systemd"), indirect=True)
def test_backup_checks_fail_on_broken_copies(
    project: Project, postgres: Postgres, redis: Redis, tmp_path: Path
) -> None:
    """A dump without the rows fails the guide's own check of the dump; a restore that leaves
    the tables to postgres (no --role) passes the guide's psql check, and fails the service,
    which reads them as its own role."""

    def schema_only(block: str) -> str:
        return block.replace("pg_dump --format=custom", "pg_dump --format=custom --schema-only")

    with pytest.raises(AssertionError, match=r"the guide's block exited 1") as failed:
        backup_and_restore(
            project, postgres, redis, "bk_schema_only", tmp_path / "a", False, schema_only
        )
    # The block that failed is the one taking the dump, at its check.
    assert "--schema-only" in str(failed.value) and "pg_restore --list" in str(failed.value)

    def no_role(block: str) -> str:
        return re.sub(r" --role=\S+", "", block) if "pg_restore --dbname" in block else block

    with pytest.raises(AssertionError, match=r"reading the items: 500"):
        backup_and_restore(project, postgres, redis, "bk_no_role", tmp_path / "b", False, no_role)
