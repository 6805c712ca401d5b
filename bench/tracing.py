"""`python -m bench.tracing`: what the `tracing` answer costs a generated service, side by side in
one run; writes bench/tracing.json and prints the figures (bench/RESULTS.md, "Tracing").

- Per request, in process (bench/tracing_layers.py, run by the project's Python): the service's
  own server span unsampled and sampled against tracing off, and against the stock
  opentelemetry-instrumentation-asgi middleware and FastAPI's native telemetry, same provider;
  and the whole process' CPU per request with every span exported to a loopback sink (this
  process), in batches of 512 and 64.
- Worker start (gunicorn start to the first 200 from /health/ready, one worker) and worker
  memory after 2,000 sampled requests: a project without tracing (tracing=false), and one with
  it, off (no endpoint) and on (exporting to a loopback sink that answers 200), interleaved.
- `--compare GIT_REF`: also the template at that ref (tracing=true), and tracing off and the
  service's own span measured in both projects (tracing_layers.py --ours-only), one project
  after the other, `--rounds` times: before and after a change, side by side.
Figures only: nothing fails on a timing.
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.helpers import UV, free_port

from . import serve
from .common import BENCH, OUT, children, hermetic_env, log, median, memory_kib, spread
from .serve import gunicorn_cmd, render_project, wait_for

STOCK = "opentelemetry-instrumentation-asgi"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
# The route measured in process.
PATH = "/api/v1/info"


@contextlib.contextmanager
def sink() -> Iterator[str]:
    """A loopback OTLP/HTTP endpoint that answers 200 to every export and reads nothing more."""

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def service_env(endpoint: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.pop("PYTHONPYCACHEPREFIX", None)
    env.pop("GUNICORN_CMD_ARGS", None)
    for name in list(env):
        if name.startswith("OTEL_"):
            del env[name]
    env.update({"ENVIRONMENT": "production", "LOG_FORMAT": "json", "WEB_CONCURRENCY": "1"})
    env["SECRET_KEY"] = "bench-" + "x" * 40
    if endpoint:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = endpoint
    return env


def start_and_memory(
    variants: dict[str, tuple[Path, str | None]], runs: int, logs: Path
) -> dict[str, Any]:
    """Each variant (a project, an OTLP endpoint or None) started `runs` times, interleaved."""
    results: dict[str, dict[str, list[float]]] = {
        label: {"start": [], "rss": [], "pss": []} for label in variants
    }
    for i in range(runs + 1):
        for label, (project, endpoint) in variants.items():
            env = service_env(endpoint)
            port = free_port()
            env["METRICS_BIND"] = f"127.0.0.1:{free_port()}"
            cmd, cwd = gunicorn_cmd("generated", project, port, None)
            with (logs / f"tracing-{label}-{i}.log").open("wb") as out:
                proc = subprocess.Popen(
                    cmd, env=env, cwd=cwd, stdout=out, stderr=out, start_new_session=True
                )
            try:  # wait_for times from the start of the process it polls
                elapsed = wait_for(proc, port, "/health/ready", interval=0.005)
                for _ in range(2000):
                    http_status_traced(port)
                workers = children(proc.pid)
                memory = memory_kib(workers[0]) if workers else {}
            finally:
                serve.stop_group(proc)
            if i > 0:  # the first round warms the page cache and writes bytecode
                results[label]["start"].append(elapsed)
                results[label]["rss"].append(memory.get("rss", 0) / 1024)
                results[label]["pss"].append(memory.get("pss", 0) / 1024)
    return {
        label: {key: {"median": median(v), "spread": spread(v)} for key, v in values.items()}
        for label, values in results.items()
    }


def http_status_traced(port: int) -> None:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/api/v1/info", headers={"traceparent": TRACEPARENT})
        conn.getresponse().read()
    finally:
        conn.close()


def tracing_layers(project: Path, env: dict[str, str], scratch: Path, *args: str) -> Any:
    """bench/tracing_layers.py on `GET PATH`, run by the project's Python: its figures
    (its stderr appended to tracing-layers.log in the scratch directory)."""
    with (scratch / "tracing-layers.log").open("ab") as err:
        proc = subprocess.run(
            [str(project / ".venv/bin/python"), str(BENCH / "tracing_layers.py"), *args, PATH],
            cwd=project,
            env=env,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            check=True,
        )
    return json.loads(proc.stdout)


def ours_only(project: Path, env: dict[str, str], scratch: Path) -> dict[str, float]:
    """Tracing off and the service's own span, unsampled and sampled, and what the span costs."""
    measured = tracing_layers(project, env, scratch, "--ours-only")
    figures: dict[str, float] = measured["results"][PATH]
    for label in ("unsampled", "sampled"):
        figures[f"cost, {label}"] = measured["paired_cost"][PATH][f"ours, {label}"]
    figures["load"] = os.getloadavg()[0]
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tracing", description=__doc__)
    parser.add_argument("--starts", type=int, default=5, help="measured starts per variant")
    parser.add_argument("--compare", metavar="GIT_REF", help="also the template at this ref")
    parser.add_argument("--rounds", type=int, default=3, help="alternations with --compare")
    args = parser.parse_args(argv)
    scratch = OUT / "tracing"
    scratch.mkdir(parents=True, exist_ok=True)
    serve.ANSWERS.clear()  # the defaults: no dependency, the cost of tracing alone
    plain = render_project(scratch / "plain", "HEAD", scratch)
    serve.ANSWERS["tracing"] = True
    project = render_project(scratch / "project", "HEAD", scratch)
    subprocess.run(
        [str(UV), "pip", "install", "-q", "--python", str(project / ".venv/bin/python"), STOCK],
        check=True,
        env=hermetic_env(scratch),
    )
    log("in process: tracing off, ours, stock asgi, FastAPI native; exported to a sink")
    env = service_env(None)
    (scratch / "tracing-layers.log").unlink(missing_ok=True)
    with sink() as endpoint:
        layers = tracing_layers(project, env, scratch, "--export-to", endpoint)
    compared: dict[str, list[dict[str, float]]] = {}
    if args.compare:
        projects = {
            args.compare: render_project(scratch / "compare", args.compare, scratch),
            "HEAD": project,
        }
        log(f"before and after: {args.compare} and HEAD, alternately, {args.rounds} rounds")
        for _ in range(args.rounds):
            for label, path in projects.items():
                compared.setdefault(label, []).append(ours_only(path, env, scratch))
    log("start and memory: without tracing, tracing off (no endpoint) and on")
    with sink() as endpoint:
        variants = {"without": (plain, None), "off": (project, None), "on": (project, endpoint)}
        process = start_and_memory(variants, args.starts, scratch)
    version = subprocess.run(
        [
            str(project / ".venv/bin/python"),
            "-c",
            "import opentelemetry.sdk.version as v; print(v.__version__)",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "load": os.getloadavg()[0],
        "opentelemetry_sdk": version,
        "in_process": layers,
        **({"compare": compared} if compared else {}),
        "process": process,
    }
    (BENCH / "tracing.json").write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
