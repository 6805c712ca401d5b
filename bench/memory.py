"""Memory per gunicorn worker of the generated service, all features on, for 1, 4 and 8 workers.

`python -m bench.memory [--compare GIT_REF]` renders the service (PostgreSQL, Redis, Sentry) from
the working tree (and at GIT_REF, side by side), starts it with its own `gunicorn.conf.py` against
throwaway PostgreSQL and Redis servers and a Sentry DSN (nothing listens there: the client and its
transport are set up, no event is sent), sends each server 60 requests per worker on fresh
connections (`/health/ready`, which uses the database pool and Redis, and `/api/v1/info`), and
reads `/proc/PID/smaps_rollup` of the master and each worker: RSS, PSS (shared pages divided
among the processes sharing them) and USS (pages of the process' own: Private_Clean +
Private_Dirty). Prints a Markdown table of the medians over the workers; figures only.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import statistics
import time
from pathlib import Path
from typing import Any

from tests.helpers import free_port
from tests.servers import postgres_server, redis_server

from .common import OUT, children, log, process_group
from .serve import render_project, server_env, wait_for

ANSWERS = {"postgres": True, "redis": True, "sentry": True}
WORKERS = (1, 4, 8)
FIELDS = {"Rss": "rss", "Pss": "pss", "Private_Clean": "uss", "Private_Dirty": "uss"}


def smaps_rollup(pid: int) -> dict[str, int]:
    """RSS, PSS and USS of a process, in KiB."""
    result = {"rss": 0, "pss": 0, "uss": 0}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in FIELDS:
            result[FIELDS[name]] += int(rest.split()[0])
    return result


def _get(port: int, path: str) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)  # a connection per request
    try:
        conn.request("GET", path)
        conn.getresponse().read()
    finally:
        conn.close()


def measure(project: Path, env: dict[str, str], workers: int, logs: Path) -> dict[str, Any]:
    port = free_port()
    cmd = [
        str(project / ".venv" / "bin" / "gunicorn"),
        "-c",
        "gunicorn.conf.py",
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        str(workers),
    ]
    env = {**env, "WEB_CONCURRENCY": str(workers), "METRICS_BIND": f"127.0.0.1:{free_port()}"}
    log_path = logs / f"{project.name}-{workers}.log"
    with process_group(cmd, env=env, cwd=project, log_path=log_path) as proc:
        wait_for(proc, port, "/health/ready")
        deadline = time.monotonic() + 60
        while len(children(proc.pid)) < workers and time.monotonic() < deadline:
            time.sleep(0.1)
        for _ in range(60 * workers):
            _get(port, "/health/ready")
            _get(port, "/api/v1/info")
        time.sleep(1)
        pids = children(proc.pid)
        per_worker = [smaps_rollup(pid) for pid in pids]
        master = smaps_rollup(proc.pid)
    return {
        "workers": len(pids),
        "worker": {k: statistics.median(w[k] for w in per_worker) for k in ("rss", "pss", "uss")},
        "master": master,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__)
    parser.add_argument("--compare", metavar="GIT_REF", help="also the template at this ref")
    args = parser.parse_args()
    scratch = OUT / "memory"
    logs = scratch / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    projects = {"working tree": render_project(scratch / "service", "HEAD", scratch, ANSWERS)}
    if args.compare:
        projects[args.compare] = render_project(
            scratch / "service-compare", args.compare, scratch, ANSWERS
        )
    rows = []
    with postgres_server() as pg, redis_server() as redis:
        env = server_env(pg.create_database("bench"), redis.url())
        env["SENTRY_DSN"] = "http://public@127.0.0.1:9/1"
        for workers in WORKERS:
            for name, project in projects.items():  # side by side, for each worker count
                log(f"memory: {name}, {workers} workers")
                result = measure(project, env, workers, logs)
                rows.append((name, workers, result))
    print("| template | workers | worker RSS | worker PSS | worker USS | master RSS | master USS |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, workers, result in rows:
        w, m = result["worker"], result["master"]
        print(
            f"| {name} | {workers} | {w['rss'] / 1024:.1f} MiB | {w['pss'] / 1024:.1f} MiB | "
            f"{w['uss'] / 1024:.1f} MiB | {m['rss'] / 1024:.1f} MiB | {m['uss'] / 1024:.1f} MiB |"
        )


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
