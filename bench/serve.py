"""What the production features cost the generated service: throughput and latency against a bare
FastAPI app under the same gunicorn settings, start time, memory per worker, and a profile.

One worker per server, pinned to one core; wrk on another core. Rounds are interleaved (bare,
generated, bare, generated, ...) so that the noise of a shared machine falls on both sides, and
each round starts with the next server, so that none is always measured first.
Worker recycling (max_requests) is turned off on both sides with `--max-requests 0`: a saturated
single worker would otherwise restart every few seconds, in the middle of a measurement.
"""

from __future__ import annotations

import collections
import contextlib
import http.client
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.helpers import UV, free_port, python_for
from tests.servers import postgres_server, redis_server

from .common import (
    BENCH,
    COPIER,
    ROOT,
    VENV_BIN,
    children,
    cpu_seconds,
    cpus,
    hermetic_env,
    log,
    median,
    memory_kib,
    pinned,
    process_group,
    spread,
    stop_group,
)

PACKAGES = [
    "fastapi",
    "starlette",
    "pydantic",
    "uvicorn",
    "uvicorn-worker",
    "gunicorn",
    "structlog",
    "orjson",
]
ANSWERS = {"postgres": True, "redis": True}  # everything else: the template's defaults
ROUTES = [  # (name, path, measured on the bare app too)
    ("live", "/health/live", True),
    ("info", "/api/v1/info", True),
    ("ready", "/health/ready", False),
]


@dataclass
class Server:
    name: str
    kind: str  # "generated" or "bare"
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    results: dict[str, list[dict[str, Any]]] = field(
        default_factory=lambda: collections.defaultdict(list)
    )

    @property
    def worker(self) -> int:
        workers = children(self.proc.pid)
        if len(workers) != 1:
            raise RuntimeError(f"{self.name}: expected one worker, found {workers}")
        return workers[0]


# ------------------------------------------------------------------------------ projects
def render_project(dst: Path, ref: str, scratch: Path) -> Path:
    """`copier copy` at a git ref (HEAD: the working tree), then `uv sync` with bytecode compiled,
    as both deployments install it (Dockerfile and deploy guide)."""
    env = hermetic_env(scratch)
    shutil.rmtree(dst, ignore_errors=True)
    cmd = [str(COPIER), "copy", "--trust", "--defaults", "--quiet", "--vcs-ref", ref]
    for key, value in ANSWERS.items():
        cmd += ["-d", f"{key}={str(value).lower()}"]
    subprocess.run([*cmd, str(ROOT), str(dst)], env=env, check=True, capture_output=True)
    version = (dst / ".python-version").read_text().strip()
    env.pop("PYTHONPYCACHEPREFIX", None)
    proc = subprocess.run(
        [str(UV), "sync", "-q", "--compile-bytecode", "--python", str(python_for(version))],
        cwd=dst,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"uv sync failed in {dst}:\n{proc.stdout}{proc.stderr}")
    return dst


def server_env(database_url: str, redis_url: str) -> dict[str, str]:
    env = dict(os.environ)
    # Bytecode as deployed: the virtualenv is precompiled; the service's own modules get cached.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.pop("PYTHONPYCACHEPREFIX", None)
    env.pop("GUNICORN_CMD_ARGS", None)
    env.update(
        {
            "ENVIRONMENT": "production",
            "LOG_FORMAT": "json",
            "LOG_LEVEL": "info",
            "WEB_CONCURRENCY": "1",
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
        }
    )
    return env


def http_status(port: int, path: str, timeout: float = 2) -> int | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    except OSError:
        return None
    finally:
        conn.close()


def wait_for(
    proc: subprocess.Popen[bytes],
    port: int,
    path: str,
    timeout: float = 120,
    interval: float = 0.01,
) -> float:
    start = time.perf_counter()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode} before answering {path}")
        if http_status(port, path, timeout=1) == 200:
            return time.perf_counter() - start
        if time.perf_counter() - start > timeout:
            raise RuntimeError(f"no 200 from {path} in {timeout} s")
        time.sleep(interval)


def gunicorn_cmd(kind: str, project: Path, port: int, cpu: int | None) -> tuple[list[str], Path]:
    gunicorn = str(project / ".venv" / "bin" / "gunicorn")
    if kind == "bare":
        conf, cwd = BENCH / "bare" / "gunicorn.conf.py", BENCH / "bare"
    else:
        conf, cwd = project / "gunicorn.conf.py", project
    cmd = [gunicorn, "-c", str(conf), "--bind", f"127.0.0.1:{port}", "--max-requests", "0"]
    return pinned(cmd, cpu), cwd


@contextlib.contextmanager
def server(
    name: str, kind: str, project: Path, env: dict[str, str], cpu: int | None, logs: Path
) -> Iterator[Server]:
    port = free_port()
    cmd, cwd = gunicorn_cmd(kind, project, port, cpu)
    log_path = logs / f"{name.replace('@', '-')}.log"
    # Servers run side by side: each master's metrics endpoint on a port of its own.
    env = {**env, "METRICS_BIND": f"127.0.0.1:{free_port()}"}
    with process_group(cmd, env=env, cwd=cwd, log_path=log_path) as proc:
        wait_for(proc, port, "/health/live")
        yield Server(name, kind, proc, port, log_path)


# ------------------------------------------------------------------------------ wrk
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not match:
        raise ValueError(f"unexpected wrk latency {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def wrk(port: int, path: str, duration: float, connections: int, cpu: int | None) -> dict[str, Any]:
    cmd = pinned(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{duration:g}s",
            "--latency",
            "--timeout",
            "10s",
            f"http://127.0.0.1:{port}{path}",
        ],
        cpu,
    )
    out = subprocess.run(
        cmd, capture_output=True, text=True, timeout=duration + 60, check=True
    ).stdout
    result: dict[str, Any] = {"non2xx": 0, "socket_errors": 0}
    for line in out.splitlines():
        line = line.strip()
        if m := re.match(r"(\d+) requests in", line):
            result["requests"] = int(m.group(1))
        elif m := re.match(r"Requests/sec:\s+([\d.]+)", line):
            result["rps"] = float(m.group(1))
        elif m := re.match(r"50%\s+(\S+)", line):
            result["p50_ms"] = _ms(m.group(1))
        elif m := re.match(r"99%\s+(\S+)", line):
            result["p99_ms"] = _ms(m.group(1))
        elif m := re.match(r"Non-2xx or 3xx responses:\s+(\d+)", line):
            result["non2xx"] = int(m.group(1))
        elif m := re.match(
            r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", line
        ):
            result["socket_errors"] = sum(int(g) for g in m.groups())
    if "rps" not in result or "p99_ms" not in result:
        raise RuntimeError(f"could not read wrk's output:\n{out}")
    return result


def measure(
    srv: Server, path: str, duration: float, connections: int, cpu: int | None
) -> dict[str, Any]:
    worker = srv.worker
    log_size = srv.log_path.stat().st_size
    cpu_before = cpu_seconds(worker)
    result = wrk(srv.port, path, duration, connections, cpu)
    result["cpu_us_per_request"] = (
        (cpu_seconds(worker) - cpu_before) / max(result["requests"], 1) * 1e6
    )
    if srv.kind == "generated":
        # Every response has exactly one access line (wrk does not count the last in-flight ones).
        with srv.log_path.open("rb") as f:
            f.seek(log_size)
            result["access_lines"] = f.read().count(b'"event":"request"')
    return result


# ------------------------------------------------------------------------------ profile
# Components of a sample: the first frame from the leaf up that belongs to one decides. Frames of
# helpers (the standard library, Starlette's header classes, ...) are skipped, so their time counts
# for whoever called them: Headers(scope) built by TrustedHostMiddleware is TrustedHost's cost.
_COMPONENTS = [
    ("RequestContextMiddleware: request id, context, headers", r"^RequestContextMiddleware\."),
    ("BodySizeLimitMiddleware", r"^BodySizeLimitMiddleware\."),
    ("TrustedHostMiddleware", r"^TrustedHostMiddleware\."),
    ("CORSMiddleware", r"^CORSMiddleware\."),
    ("access log line (structlog, logging, JSON, write)", r"structlog/|/logging/|/logs\.py|orjson"),
    ("request head limits (http_limits)", r"^LimitedHttpToolsProtocol\.|/http_limits\.py"),
    ("uvicorn: HTTP parsing, transport, event loop", r"uvicorn|httptools|asyncio/runners|uvloop"),
    ("endpoint code", r"/health\.py|/api\.py"),
    (
        "FastAPI/Starlette: app layers, routing, dependencies, response",
        r"fastapi/|starlette/(?!datastructures|_utils)|pydantic",
    ),
]


def summarise_profile(raw: Path) -> list[tuple[str, float]]:
    """Shares of the event loop thread's busy samples, from py-spy's collapsed stacks (a stack,
    then how many samples had it), per component of the request path."""
    patterns = [(label, re.compile(pattern)) for label, pattern in _COMPONENTS]
    counts: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit() or "UvicornWorker.run" not in stack:
            continue  # not the event loop thread (e.g. an idle thread-pool worker)
        label = "other"
        for frame in reversed(stack.split(";")):
            found = next((name for name, pattern in patterns if pattern.search(frame)), None)
            if found:
                label = found
                break
        counts[label] += int(count)
    total = sum(counts.values())
    return [(label, 100 * n / total) for label, n in counts.most_common()] if total else []


def profile(
    srv: Server, path: str, seconds: float, connections: int, wrk_cpu: int | None, out: Path
) -> list[tuple[str, float]]:
    raw = out / f"profile-{srv.name.replace('@', '-')}.raw"
    pyspy = subprocess.Popen(
        [
            str(VENV_BIN / "py-spy"),
            "record",
            "-p",
            str(srv.worker),
            "-d",
            f"{seconds:g}",
            "-r",
            "250",
            "-f",
            "raw",
            "-o",
            str(raw),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wrk(srv.port, path, seconds + 2, connections, wrk_cpu)
    finally:
        try:
            pyspy.wait(timeout=seconds + 60)
        except subprocess.TimeoutExpired:
            pyspy.kill()
            pyspy.wait()
    return summarise_profile(raw) if raw.exists() else []


def layer_costs(project: Path, env: dict[str, str], out: Path) -> dict[str, Any]:
    """In-process CPU time per request of each layer (bench/layers.py, run by the project)."""
    cmd = [str(project / ".venv" / "bin" / "python"), str(BENCH / "layers.py"), str(BENCH / "bare")]
    with (out / f"layers-{project.name}.log").open("wb") as err:
        proc = subprocess.run(
            [*cmd, "/health/live", "/api/v1/info"],
            cwd=project,
            env=env,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            timeout=900,
        )
    if proc.returncode != 0:
        return {"error": f"layers.py exited {proc.returncode}: see {err.name}"}
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


# ------------------------------------------------------------------------------ start time
def start_times(project: Path, env: dict[str, str], runs: int, scratch: Path) -> dict[str, Any]:
    """gunicorn start to the first 200 from /health/ready, one worker: with bytecode (as deployed,
    `runs` times) and, interleaved, without any (every module compiled from source, 3 times)."""
    cold_env = {
        **env,
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONPYCACHEPREFIX": str(scratch / "no-bytecode"),
    }
    results: dict[str, list[float]] = {"bytecode": [], "no_bytecode": []}
    for i in range(runs + 1):
        for label, run_env in (("bytecode", env), ("no_bytecode", cold_env)):
            if label == "no_bytecode" and i > 3:
                continue
            port = free_port()
            cmd, cwd = gunicorn_cmd("generated", project, port, None)
            start = time.perf_counter()
            proc = subprocess.Popen(
                cmd,
                env=run_env,
                cwd=cwd,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            try:
                wait_for(proc, port, "/health/ready", interval=0.005)
                elapsed = time.perf_counter() - start
            finally:
                stop_group(proc)
            if i > 0:  # the first pair warms the page cache and writes the service's own bytecode
                results[label].append(elapsed)
    return {
        label: {"median": median(v), "spread": spread(v), "runs": v} for label, v in results.items()
    }


# ------------------------------------------------------------------------------ the run
def summarise(servers: list[Server]) -> dict[str, Any]:
    bare = next(s for s in servers if s.kind == "bare")
    routes: dict[str, Any] = {}
    for route, path, on_bare in ROUTES:
        entry: dict[str, Any] = {"path": path, "servers": {}}
        for srv in servers:
            runs = srv.results.get(route)
            if not runs:
                continue
            stats: dict[str, Any] = {
                key: median([r[key] for r in runs])
                for key in ("rps", "p50_ms", "p99_ms", "cpu_us_per_request")
            }
            stats["rps_spread"] = spread([r["rps"] for r in runs])
            stats["non2xx"] = sum(r["non2xx"] for r in runs)
            stats["socket_errors"] = sum(r["socket_errors"] for r in runs)
            stats["rounds"] = runs
            if on_bare and srv is not bare:
                ratios = [
                    g["rps"] / b["rps"] for g, b in zip(runs, bare.results[route], strict=True)
                ]
                cpu_ratios = [
                    b["cpu_us_per_request"] / g["cpu_us_per_request"]
                    for g, b in zip(runs, bare.results[route], strict=True)
                ]
                stats["ratio"] = {
                    "median": median(ratios),
                    "spread": spread(ratios),
                    "rounds": ratios,
                }
                stats["cpu_ratio"] = {"median": median(cpu_ratios), "spread": spread(cpu_ratios)}
            if srv.kind == "generated":
                served = sum(r["requests"] for r in runs)
                lines = sum(r["access_lines"] for r in runs)
                stats["access_lines_per_response"] = lines / served if served else float("nan")
            entry["servers"][srv.name] = stats
        routes[route] = entry
    return routes


def run(
    scratch: Path,
    *,
    rounds: int,
    duration: float,
    connections: int,
    start_runs: int,
    compare: str | None,
    do_profile: bool,
) -> dict[str, Any]:
    scratch.mkdir(parents=True, exist_ok=True)
    logs = scratch / "logs"
    logs.mkdir(exist_ok=True)
    available = cpus()
    server_cpu, wrk_cpu = (available[0], available[1]) if len(available) >= 2 else (None, None)

    log("serve: rendering the service (postgres, redis) and syncing its virtualenv")
    # The working tree is rendered (so a change can be measured before it is committed).
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    dirty = subprocess.run(
        [
            "git",
            "-C",
            str(ROOT),
            "status",
            "--porcelain",
            "--",
            "template",
            "includes",
            "copier.yml",
            "hooks",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    source = f"the working tree at `{head}`" + (
        " with uncommitted template changes" if dirty else ""
    )
    projects = {"generated": render_project(scratch / "service", "HEAD", scratch)}
    if compare:
        sha = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", compare],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        projects[f"generated@{sha}"] = render_project(scratch / f"service-{sha}", sha, scratch)

    with postgres_server() as pg, redis_server() as redis, contextlib.ExitStack() as stack:
        env = server_env(pg.create_database("bench"), redis.url())
        versions = subprocess.run(
            [
                str(projects["generated"] / ".venv" / "bin" / "python"),
                "-c",
                "import importlib.metadata as m, sys; "
                "print(sys.version.split()[0], *(m.version(p) for p in sys.argv[1:]))",
                *PACKAGES,
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        package_versions = dict(zip(["python", *PACKAGES], versions, strict=True))

        log("serve: start time (gunicorn start to the first 200 from /health/ready)")
        start = start_times(projects["generated"], env, start_runs, scratch)

        log("serve: starting the bare app and the generated service (one worker each)")
        servers = [
            stack.enter_context(
                server("bare", "bare", projects["generated"], env, server_cpu, logs)
            )
        ]
        servers += [
            stack.enter_context(server(name, "generated", path, env, server_cpu, logs))
            for name, path in projects.items()
        ]
        plan = [
            (route, path, [s for s in servers if on_bare or s.kind != "bare"])
            for route, path, on_bare in ROUTES
        ]

        log("serve: warm-up")
        for _route, path, targets in plan:
            for srv in targets:
                wrk(srv.port, path, 2, connections, wrk_cpu)
        for r in range(rounds):
            log(f"serve: round {r + 1}/{rounds}")
            for route, path, targets in plan:
                # Each round starts with the next server: no server always runs first or last.
                start_at = r % len(targets)
                for srv in targets[start_at:] + targets[:start_at]:
                    srv.results[route].append(measure(srv, path, duration, connections, wrk_cpu))
        memory = {
            srv.name: {"worker": memory_kib(srv.worker), "master": memory_kib(srv.proc.pid)}
            for srv in servers
        }
        profiles = {}
        if do_profile:
            log("serve: profiling the generated worker under load (py-spy)")
            main = next(s for s in servers if s.name == "generated")
            profiles[main.name] = profile(main, "/health/live", 12, connections, wrk_cpu, scratch)
        routes = summarise(servers)
    layers = {}
    if do_profile:
        log("serve: in-process cost of each layer (bench/layers.py)")
        for name, path in projects.items():
            layers[name] = layer_costs(path, env, scratch)

    return {
        "settings": {
            "rounds": rounds,
            "duration_s": duration,
            "connections": connections,
            "server_cpu": server_cpu,
            "wrk_cpu": wrk_cpu,
            "answers": ANSWERS,
            "environment": "ENVIRONMENT=production LOG_FORMAT=json WEB_CONCURRENCY=1",
            "compare": compare,
            "source": source,
        },
        "versions": package_versions,
        "routes": routes,
        "start": start,
        "memory": memory,
        "profile": profiles,
        "layers": layers,
        "target_ratio": 0.9,
    }
