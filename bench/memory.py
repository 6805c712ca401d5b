"""Memory per gunicorn worker of the generated service, all features on, for 1, 4 and 8 workers,
and its start against the bare app's.

`python -m bench.memory [--compare GIT_REF] [--starts N]` renders the service (PostgreSQL, Redis,
Sentry, tracing) from the working tree (and at GIT_REF, side by side), starts it with its own
`gunicorn.conf.py` against throwaway PostgreSQL and Redis servers, a Sentry DSN (nothing listens
there: the client and its transport are set up, no event is sent) and an OTLP endpoint (a
loopback sink that answers 200: every request's spans are exported), sends each server 60
pairs of requests per worker on fresh connections (`/health/ready`, which uses the database pool
and Redis, and `/api/v1/info`), and reads `/proc/PID/smaps_rollup` of the master and each worker:
RSS, PSS (shared pages divided among the processes sharing them) and USS (pages of the process'
own: Private_Clean + Private_Dirty). Then it goes on to 2,000 pairs per worker and reads them
again: the steady state, where what a worker holds for a while has reached its high-water mark
(the span queue between two exports of 512 spans, the pools), read once more after 500 pairs
fewer to show it flat. Prints a Markdown table of the medians over the workers, early and
steady, with where a worker's own pages are (`/proc/PID/smaps` by mapping: the heap, anonymous
maps, files). `--tracing-off`: no OTLP endpoint (tracing rendered, off).

Start (`--starts N`, 0 to skip): one worker, from starting gunicorn to the first 200 from
`/health/ready` (the service: PostgreSQL and Redis checked) and from `/health/live` (the bare
app, `bench/bare/` under the same gunicorn settings, which has no other route), with bytecode
as both deployments install it; each project and the bare app in turn, N rounds after a warm-up
round. Figures only.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import http.client
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.helpers import UV, free_port, python_for
from tests.servers import postgres_server, redis_server

from .common import (
    OUT,
    children,
    hermetic_env,
    loadavg,
    log,
    median,
    process_group,
    spread,
    stop_group,
)
from .serve import gunicorn_cmd, render_project, server_env, wait_for
from .tracing import sink

ANSWERS = {"postgres": True, "redis": True, "sentry": True, "tracing": True}
WORKERS = (1, 4, 8)
# Pairs of requests per worker before each reading: early, then steady (and FLAT pairs before).
EARLY, STEADY, FLAT = 60, 2000, 500
FIELDS = {"Rss": "rss", "Pss": "pss", "Private_Clean": "uss", "Private_Dirty": "uss"}


def smaps_rollup(pid: int) -> dict[str, int]:
    """RSS, PSS and USS of a process, in KiB."""
    result = {"rss": 0, "pss": 0, "uss": 0}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in FIELDS:
            result[FIELDS[name]] += int(rest.split()[0])
    return result


def as_deployed(project: Path, scratch: Path) -> Path:
    """The project's virtualenv without the dev group, bytecode compiled: as both deployments
    install it (`uv sync --locked --no-dev --compile-bytecode`). With the dev group, sentry-sdk's
    httpx integration would import httpx (and its command line's pygments) in every start."""
    env = hermetic_env(scratch)
    env.pop("PYTHONPYCACHEPREFIX", None)
    version = (project / ".python-version").read_text().strip()
    subprocess.run(
        [
            str(UV),
            "sync",
            "-q",
            "--no-dev",
            "--compile-bytecode",
            "--python",
            str(python_for(version)),
        ],
        cwd=project,
        env=env,
        check=True,
    )
    return project


def private_by_mapping(pid: int) -> dict[str, int]:
    """A process' own pages (Private_Clean + Private_Dirty), in KiB, by kind of mapping."""
    result: collections.Counter[str] = collections.Counter()
    kind = "anonymous"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        first = line.split(None, 1)[0]
        if "-" in first and not first.endswith(":"):  # a mapping's header line
            fields = line.split(None, 5)
            name = fields[5].strip() if len(fields) > 5 else ""
            if name == "[heap]":
                kind = "heap"
            elif name.startswith("["):
                kind = "stack and other"
            elif name:
                kind = "files"
            else:
                kind = "anonymous"
        elif first in ("Private_Clean:", "Private_Dirty:"):
            result[kind] += int(line.split()[1])
    return dict(result)


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
        readings = {}
        sent = 0
        for pairs in (EARLY, STEADY - FLAT, STEADY):  # per worker
            for _ in range((pairs - sent) * workers):
                _get(port, "/health/ready")
                _get(port, "/api/v1/info")
            sent = pairs
            time.sleep(1)
            readings[pairs] = _reading(proc.pid)
    if len({tuple(reading["pids"]) for reading in readings.values()}) != 1:
        # max_requests is 10,000 (+ jitter) requests: 2,000 pairs stay below it.
        raise SystemExit(f"{project.name}: a worker was replaced while it was measured")
    return {"early": readings[EARLY], "flat": readings[STEADY - FLAT], "steady": readings[STEADY]}


def _reading(master: int) -> dict[str, Any]:
    pids = sorted(children(master))
    per_worker = [smaps_rollup(pid) for pid in pids]
    by_mapping = [private_by_mapping(pid) for pid in pids]
    kinds = sorted({kind for w in by_mapping for kind in w})
    return {
        "pids": pids,
        "worker": {k: statistics.median(w[k] for w in per_worker) for k in ("rss", "pss", "uss")},
        "private": {k: statistics.median(w.get(k, 0) for w in by_mapping) for k in kinds},
        "master": smaps_rollup(master),
    }


def start_times(
    projects: dict[str, Path], env: dict[str, str], runs: int, logs: Path
) -> dict[str, dict[str, Any]]:
    """Each project and the bare app started in turn (one worker), `runs` rounds after a warm-up
    round: seconds to the first 200."""
    bare_project = next(iter(projects.values()))  # its virtualenv runs the bare app
    targets = [(name, "generated", project) for name, project in projects.items()]
    targets.append(("bare", "bare", bare_project))
    results: dict[str, list[float]] = {name: [] for name, _, _ in targets}
    for i in range(runs + 1):
        for name, kind, project in targets[i % len(targets) :] + targets[: i % len(targets)]:
            port = free_port()
            cmd, cwd = gunicorn_cmd(kind, project, port, None)
            run_env = {**env, "WEB_CONCURRENCY": "1", "METRICS_BIND": f"127.0.0.1:{free_port()}"}
            with (logs / f"start-{kind}-{i}.log").open("wb") as out:
                start = time.perf_counter()
                proc = subprocess.Popen(
                    cmd, env=run_env, cwd=cwd, stdout=out, stderr=out, start_new_session=True
                )
            try:
                path = "/health/live" if kind == "bare" else "/health/ready"
                wait_for(proc, port, path, interval=0.005)
                elapsed = time.perf_counter() - start
            finally:
                stop_group(proc)
            if i > 0:  # the first round warms the page cache and writes the service's bytecode
                results[name].append(elapsed)
    summary: dict[str, dict[str, Any]] = {}
    for name, values in results.items():
        ratios = [v / b for v, b in zip(values, results["bare"], strict=True)]
        summary[name] = {
            "median": median(values),
            "spread": spread(values),
            "ratio": median(ratios),
            "ratio_spread": spread(ratios),
        }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__)
    parser.add_argument("--compare", metavar="GIT_REF", help="also the template at this ref")
    parser.add_argument("--starts", type=int, default=10, help="measured start rounds (0: none)")
    parser.add_argument(
        "--workers", type=int, nargs="*", default=list(WORKERS), help="worker counts measured"
    )
    parser.add_argument("--tracing-off", action="store_true", help="no OTLP endpoint")
    args = parser.parse_args()
    scratch = OUT / "memory"
    logs = scratch / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    projects = {
        "working tree": as_deployed(
            render_project(scratch / "service", "HEAD", scratch, ANSWERS), scratch
        )
    }
    if args.compare:
        projects[args.compare] = as_deployed(
            render_project(scratch / "service-compare", args.compare, scratch, ANSWERS), scratch
        )
    rows = []
    loads = [loadavg()[0]]
    starts: dict[str, dict[str, Any]] = {}
    with postgres_server() as pg, redis_server() as redis, sink() as endpoint:
        env = server_env(pg.create_database("bench"), redis.url())
        env["SENTRY_DSN"] = "http://public@127.0.0.1:9/1"
        if not args.tracing_off:
            env["OTEL_EXPORTER_OTLP_ENDPOINT"] = endpoint
        if args.starts:
            log("start: gunicorn start to the first 200, the service(s) and the bare app in turn")
            starts = start_times(projects, env, args.starts, logs)
            loads.append(loadavg()[0])
        for workers in args.workers:
            for name, project in projects.items():  # side by side, for each worker count
                log(f"memory: {name}, {workers} workers")
                result = measure(project, env, workers, logs)
                rows.append((name, workers, result))
                loads.append(loadavg()[0])
    print(f"load average (1 min) during the run: {min(loads):.1f} to {max(loads):.1f}")
    if starts:
        print("\n| start | median | spread | ratio to the bare app (spread) |")
        print("|---|---:|---:|---:|")
        for name, s in starts.items():
            print(
                f"| {name} | {s['median']:.2f} s | {s['spread'][0]:.2f} to {s['spread'][1]:.2f} | "
                f"{s['ratio']:.2f}x ({s['ratio_spread'][0]:.2f} to {s['ratio_spread'][1]:.2f}) |"
            )
    print()
    print(
        f"| template | workers | worker PSS / USS after {EARLY} pairs | after {STEADY - FLAT} | "
        f"after {STEADY} (steady) | worker RSS (steady) | master RSS | master USS |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")

    def pss_uss(reading: dict[str, Any]) -> str:
        return f"{reading['worker']['pss'] / 1024:.1f} / {reading['worker']['uss'] / 1024:.1f} MiB"

    for name, workers, result in rows:
        steady, m = result["steady"], result["steady"]["master"]
        print(
            f"| {name} | {workers} | {pss_uss(result['early'])} | {pss_uss(result['flat'])} | "
            f"**{pss_uss(steady)}** | {steady['worker']['rss'] / 1024:.1f} MiB | "
            f"{m['rss'] / 1024:.1f} MiB | {m['uss'] / 1024:.1f} MiB |"
        )
    print("\nA worker's own pages by mapping (medians over the workers), early -> steady:\n")
    for name, workers, result in rows:
        early, steady = result["early"]["private"], result["steady"]["private"]
        parts = ", ".join(
            f"{k} {early.get(k, 0) / 1024:.1f} -> {v / 1024:.1f} MiB" for k, v in steady.items()
        )
        print(f"- {name}, {workers} workers: {parts}")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
