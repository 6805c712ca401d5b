"""`python -m bench.bytecode`: how much of the image's bytecode the service uses, and what the
rest is worth at start; writes bench/bytecode.json and prints the figures (bench/RESULTS.md,
"Containers", fourth pass).

The all-features docker project (tracing on, Python 3.12: test_image's largest image) is
installed as its Dockerfile installs it (`uv sync --locked --no-dev --no-install-project`, the
service as a regular package, the stage's test suites of SQLAlchemy, Alembic, Mako and greenlet
removed), into virtualenvs that differ only in their bytecode:

- `none`: no bytecode. The migration (`alembic upgrade head`) and then the service (gunicorn, two
  workers, every optional part configured: PostgreSQL, Redis, a Sentry DSN and an OTLP endpoint,
  both unreachable) run in it with bytecode writing on, and a few requests of each kind are
  made: every module they import gets its bytecode written, so what is there afterwards is what
  the service and the migration import (the master's and the workers').
- `all`: every module compiled (UV_COMPILE_BYTECODE, the Dockerfile's now).
- `used`: only the modules the service or the migration imported.
- `service`: only the modules the service imported (the migration's own compiled in memory).

Then, interleaved, `--starts` rounds of: the migration on a new database, and gunicorn's start to
the first 200 from /health/ready, in each virtualenv, with PYTHONDONTWRITEBYTECODE=1 (as in the
image, whose root file system is read-only). Sizes are the bytes of the .pyc files and of a tar
of site-packages (what an image layer holds: a 512-byte header per file, contents in 512-byte
blocks). Figures only: nothing fails on a timing.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import io
import json
import os
import shutil
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Any

from tests.helpers import UV, free_port, python_for
from tests.servers import postgres_server, redis_server

from .common import BENCH, COPIER, OUT, ROOT, hermetic_env, log, median, spread, stop_group
from .serve import http_status, wait_for

PYTHON = "3.12"
ANSWERS = {
    "deployment": "docker",
    "python_version": PYTHON,
    "postgres": True,
    "redis": True,
    "sentry": True,
    "tracing": True,
}
# What the Dockerfile's dependencies stage removes after `uv sync` (with PostgreSQL).
REMOVED = ("sqlalchemy/testing", "alembic/testing", "mako/testing", "greenlet/tests")
VARIANTS = ("all", "used", "service", "none")
REQUESTS = (  # method, path, body: one of each kind of answer the routes give
    ("GET", "/health/live", None),
    ("GET", "/health/ready", None),
    ("GET", "/api/v1/info", None),
    ("POST", "/api/v1/counters/bench", b""),
    ("POST", "/api/v1/items", b'{"name": "bench"}'),
    ("GET", "/api/v1/items", None),
    ("GET", "/api/v1/items/1", None),
    ("GET", "/api/v1/nowhere", None),
    ("POST", "/api/v1/items", b"{not json"),
)


def request(port: int, method: str, path: str, body: bytes | None) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        headers = {"Host": "api.example.com", "Content-Type": "application/json"}
        conn.request(method, path, body=body, headers=headers)
        return conn.getresponse().status
    finally:
        conn.close()


def install(project: Path, venv: Path, scratch: Path, compile_bytecode: bool) -> Path:
    """The Dockerfile's virtualenv at venv; returns its site-packages."""
    env = hermetic_env(scratch)
    env.pop("PYTHONPYCACHEPREFIX", None)
    env["UV_PROJECT_ENVIRONMENT"] = str(venv)
    python = str(python_for(PYTHON))
    flag = "--compile-bytecode" if compile_bytecode else "--no-compile-bytecode"
    sync = [str(UV), "sync", "-q", "--locked", "--no-dev", "--no-install-project", flag]
    subprocess.run([*sync, "--python", python], cwd=project, env=env, check=True)
    packages = next(venv.glob("lib/python3.*/site-packages"))
    for removed in REMOVED:
        shutil.rmtree(packages / removed)
    pip = [str(UV), "pip", "install", "-q", "--no-deps", "--python", str(venv / "bin/python")]
    subprocess.run([*pip, flag, str(project)], env=env, check=True)
    return packages


def pycs(packages: Path) -> dict[str, int]:
    return {str(p.relative_to(packages)): p.stat().st_size for p in packages.rglob("*.pyc")}


def tar_bytes(packages: Path) -> int:
    sink = io.BytesIO()
    with tarfile.open(fileobj=sink, mode="w", format=tarfile.GNU_FORMAT) as tar:
        tar.add(packages, arcname="site-packages")
    return sink.tell()


def service_env(venv: Path, database_url: str, redis_url: str, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PYTHONPYCACHE"))}
    env.pop("VIRTUAL_ENV", None)
    env.update(
        {
            "PATH": f"{venv / 'bin'}:{env['PATH']}",
            "PYTHONDONTWRITEBYTECODE": "1",
            "ENVIRONMENT": "production",
            "SECRET_KEY": "bench-" + "x" * 40,
            "LOG_FORMAT": "json",
            "WEB_CONCURRENCY": "2",
            "BIND": f"127.0.0.1:{port}",
            "METRICS_BIND": f"127.0.0.1:{free_port()}",
            "ALLOWED_HOSTS": "api.example.com,127.0.0.1",
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            # Sentry and tracing on, as configured in production; nothing answers there.
            "SENTRY_DSN": f"http://key@127.0.0.1:{free_port()}/1",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}",
        }
    )
    return env


def migrate(project: Path, venv: Path, env: dict[str, str]) -> float:
    started = time.perf_counter()
    cmd = [str(venv / "bin/python"), "-m", "alembic", "upgrade", "head"]
    subprocess.run(cmd, cwd=project, env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def serve(project: Path, venv: Path, env: dict[str, str], log_path: Path, requests: bool) -> float:
    cmd = [str(venv / "bin/python"), "-m", "gunicorn", "-c", "gunicorn.conf.py"]
    port = int(env["BIND"].rpartition(":")[2])
    with log_path.open("ab") as out:
        proc = subprocess.Popen(
            cmd, cwd=project, env=env, stdout=out, stderr=out, start_new_session=True
        )
    try:
        elapsed = wait_for(proc, port, "/health/ready", interval=0.005)
        if requests:
            for _ in range(4):  # each worker gets some
                statuses = [request(port, *r) for r in REQUESTS]
            assert statuses == [200, 200, 200, 200, 201, 200, 200, 404, 422], statuses
            assert http_status(int(env["METRICS_BIND"].rpartition(":")[2]), "/metrics") == 200
    finally:
        stop_group(proc)
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bytecode", description=__doc__)
    parser.add_argument("--starts", type=int, default=8, help="measured rounds")
    args = parser.parse_args(argv)
    scratch = OUT / "bytecode"
    shutil.rmtree(scratch, ignore_errors=True)
    project = scratch / "project"
    env = hermetic_env(scratch)
    cmd = [str(COPIER), "copy", "--trust", "--defaults", "--quiet", "--vcs-ref", "HEAD"]
    for key, value in ANSWERS.items():
        cmd += ["-d", f"{key}={str(value).lower() if isinstance(value, bool) else value}"]
    subprocess.run([*cmd, str(ROOT), str(project)], env=env, check=True, capture_output=True)
    python = str(python_for(PYTHON))
    subprocess.run([str(UV), "lock", "-q", "--python", python], cwd=project, env=env, check=True)

    log("installing: without bytecode, and compiled")
    venvs = {name: scratch / name for name in VARIANTS}
    none = install(project, venvs["none"], scratch, compile_bytecode=False)
    compiled = install(project, venvs["all"], scratch, compile_bytecode=True)
    installed = pycs(compiled)

    log("what the service, then the migration, import (bytecode written as they run)")
    imported: dict[str, set[str]] = {}
    with postgres_server() as pg, redis_server() as redis:
        for database in ("probe", "migrated"):
            pg.create_database(database)
        url = pg.url("probe", "postgresql+asyncpg")
        # The tables, made from the compiled virtualenv (nothing written in `none`).
        migrate(project, venvs["all"], service_env(venvs["all"], url, redis.url(), 0))
        env = service_env(venvs["none"], url, redis.url(), free_port())
        env.pop("PYTHONDONTWRITEBYTECODE")
        serve(project, venvs["none"], env, scratch / "probe.log", requests=True)
        imported["service"] = set(pycs(none))
        env["DATABASE_URL"] = pg.url("migrated", "postgresql+asyncpg")
        migrate(project, venvs["none"], env)
        imported["used"] = set(pycs(none))
    for path in none.rglob("*.pyc"):
        path.unlink()

    for name in ("used", "service"):
        shutil.rmtree(venvs[name], ignore_errors=True)
        subprocess.run(["cp", "-a", str(venvs["all"]), str(venvs[name])], check=True)
        packages = next(venvs[name].glob("lib/python3.*/site-packages"))
        for relative in set(installed) - imported[name]:
            (packages / relative).unlink()

    sizes: dict[str, Any] = {}
    for name in VARIANTS:
        packages = next(venvs[name].glob("lib/python3.*/site-packages"))
        kept = pycs(packages)
        sizes[name] = {
            "pyc_files": len(kept),
            "pyc_mb": round(sum(kept.values()) / 1e6, 2),
            "site_packages_tar_mb": round(tar_bytes(packages) / 1e6, 2),
        }
    unused = {k: v for k, v in installed.items() if k not in imported["used"]}
    by_package: collections.Counter[str] = collections.Counter()
    for relative, size in unused.items():
        parts = relative.split("/")
        by_package["/".join(parts[:2]) if len(parts) > 2 else parts[0]] += size

    log(f"start: {args.starts} rounds of {', '.join(VARIANTS)}, interleaved")
    times: dict[str, dict[str, list[float]]] = {
        name: {"migrate_s": [], "ready_s": []} for name in VARIANTS
    }
    with postgres_server() as pg, redis_server() as redis:
        for round_ in range(args.starts + 1):
            for name in VARIANTS:
                database = f"{name}{round_}"
                pg.create_database(database)
                url = pg.url(database, "postgresql+asyncpg")
                env = service_env(venvs[name], url, redis.url(), free_port())
                migrated = migrate(project, venvs[name], env)
                ready = serve(project, venvs[name], env, scratch / f"{name}.log", False)
                if round_ > 0:  # the first round warms the page cache
                    times[name]["migrate_s"].append(migrated)
                    times[name]["ready_s"].append(ready)
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "load": os.getloadavg(),
        "answers": ANSWERS,
        "sizes": sizes,
        "unused_pyc_mb_by_package": {
            k: round(v / 1e6, 2) for k, v in by_package.most_common() if v >= 50_000
        },
        "times": {
            name: {
                key: {"median": round(median(v), 2), "spread": [round(x, 2) for x in spread(v)]}
                for key, v in values.items()
            }
            for name, values in times.items()
        },
    }
    (BENCH / "bytecode.json").write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
