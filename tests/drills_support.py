"""Support for the drills (tests/test_drills.py): a generated service under gunicorn with the
generated config, dependencies the test can stop, freeze and restart, a Sentry-compatible
receiver, raw HTTP on loopback, and the figures each drill reports."""

from __future__ import annotations

import contextlib
import gzip
import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from .helpers import ROOT, free_port
from .servers import _as_postgres_user, _pg_bindir, initdb, redis_command
from .services import children_of

# A module written next to (not into) the generated project and put on PYTHONPATH: the generated
# application plus two routes the drills need. gunicorn gets it as its positional app argument,
# which wins over `wsgi_app` in the generated config (everything else comes from that config).
DRILL_APP = '''\
"""Drill routes on top of the generated application (written by the template's drills)."""

import asyncio
import os
import sys
import time
from pathlib import Path

import httpx
import sentry_sdk
from fastapi import FastAPI, Request
from sqlalchemy import text

from my_service.main import create_app

# Which process imports the application: the gunicorn master once (preload_app), not each worker.
with Path(os.environ["DRILL_DIR"], "imported-by").open("a") as marker:
    marker.write(f"{os.getpid()} {os.getppid()}\\n")

# The modules a worker has when it is forked (the master's): whoami reports what it imported since.
modules_at_fork: frozenset[str] = frozenset()


def _forked() -> None:
    global modules_at_fork
    modules_at_fork = frozenset(sys.modules)


os.register_at_fork(after_in_child=_forked)


def create() -> FastAPI:
    app = create_app()

    @app.get("/api/v1/drill/boom")
    async def boom() -> None:
        raise RuntimeError("drill: internal detail that must not reach the client")

    @app.get("/api/v1/drill/slow")
    async def slow(request: Request, seconds: float, tag: str) -> dict[str, object]:
        """Sleeps, watching the drain flag; then asks the app's own /health/ready in-process
        (by then the listener is closed: no new connection reaches this worker)."""
        started = time.time()
        Path(os.environ["DRILL_DIR"], f"started-{tag}").write_text(str(os.getpid()))
        draining_since = None
        while time.time() - started < seconds:
            if draining_since is None and request.app.state.lifecycle.draining:
                draining_since = time.time()
            await asyncio.sleep(0.01)
        transport = httpx.ASGITransport(app=request.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            # Its own task: the in-process request binds its own request id.
            ready = await asyncio.create_task(client.get("/health/ready"))
        return {
            "pid": os.getpid(),
            "draining_since": draining_since,
            "ready_status": ready.status_code,
            "ready_body": ready.json(),
        }

    @app.get("/api/v1/drill/whoami")
    async def whoami(request: Request) -> dict[str, object]:
        """The worker that answers: its pid, the PostgreSQL backend and the Redis client id of
        the connections it uses, a Sentry event sent through its own client (flushed: by its
        own transport thread), and the modules it has imported since it was forked."""
        async with request.app.state.engine.connect() as connection:
            backend = (await connection.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        redis_client = await request.app.state.redis.client_id()
        sentry_sdk.capture_message(f"whoami {os.getpid()}")
        await asyncio.to_thread(sentry_sdk.flush, 5)
        return {
            "pid": os.getpid(),
            "postgres_backend": backend,
            "redis_client": redis_client,
            "imported_after_fork": sorted(set(sys.modules) - modules_at_fork),
        }

    return app
'''


# --------------------------------------------------------------------------- figures

FIGURES_DIR = ROOT / ".pytest_cache" / "drills"


def report(request: pytest.FixtureRequest, drill: str, figures: dict[str, Any]) -> None:
    """Record a drill's figures where CI shows them: one `DRILL {json}` line written to the
    real stderr (past pytest's capture, so it is in the CI log with or without -s, from xdist
    workers too), the test's user properties (junit XML), and one JSON file per test under
    .pytest_cache/drills/ (git-ignored; overwritten by the next run)."""
    record = {"drill": drill, "test": request.node.nodeid, **figures}
    line = json.dumps(record, sort_keys=True)
    request.node.user_properties.append((drill, json.dumps(figures, sort_keys=True)))
    FIGURES_DIR.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
    (FIGURES_DIR / f"{name}.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        sys.stderr.write(f"\nDRILL {line}\n")
        sys.stderr.flush()


@contextlib.contextmanager
def load_generator(workdir: Path, *args: str) -> Iterator[Callable[[], dict[str, Any]]]:
    """tests/drills_load.py run with ARGS in a process of its own until the yielded function is
    called: it stops the load (through a stop file the load watches) and returns its figures.
    Killed if the test ends first."""
    stop_file = workdir / f"stop-load-{time.monotonic_ns()}"
    cmd = [sys.executable, str(ROOT / "tests" / "drills_load.py"), *args]
    cmd += ["--stop-file", str(stop_file)]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def finish() -> dict[str, Any]:
        stop_file.touch()
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
        return dict(json.loads(out))

    try:
        yield finish
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# --------------------------------------------------------------------------- the drill app


def drill_app_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "drill_app"
    directory.mkdir(exist_ok=True)
    (directory / "drill_app.py").write_text(DRILL_APP)
    return directory


# --------------------------------------------------------------------------- dependencies


def _signal_all(pids: list[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


class PostgresInstance:
    """A PostgreSQL server of the drill's own (never the shared session one) that can be
    stopped, frozen (SIGSTOP: a server that accepts nothing and answers nothing) and started
    again on the same port and data directory."""

    def __init__(self) -> None:
        self.bindir = _pg_bindir()
        self.base = Path(tempfile.mkdtemp(prefix="tpl-drill-pg-"))
        self.data = self.base / "data"
        self.prefix = _as_postgres_user()
        if self.prefix:
            shutil.chown(self.base, "postgres", "postgres")
        self.port = free_port()
        initdb(self.bindir, self.data, self.prefix)
        self.frozen: list[int] = []

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _pg_ctl(self, *args: str) -> None:
        subprocess.run(
            [*self.prefix, str(self.bindir / "pg_ctl"), "-D", str(self.data), *args],
            check=True,
            capture_output=True,
            timeout=60,
        )

    def start(self) -> None:
        self._pg_ctl(
            "-l",
            str(self.base / "server.log"),
            "-w",
            "-t",
            "60",
            "start",
            "-o",
            f"-h 127.0.0.1 -p {self.port} -k {self.base} -F -c fsync=off "
            "-c full_page_writes=off -c synchronous_commit=off",
        )

    def stop(self) -> None:
        self._pg_ctl("-m", "fast", "-w", "stop")

    def _pids(self) -> list[int]:
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        return [postmaster, *children_of(postmaster)]

    def freeze(self) -> None:
        self.frozen = self._pids()
        _signal_all(self.frozen, signal.SIGSTOP)

    def thaw(self) -> None:
        _signal_all(self.frozen, signal.SIGCONT)
        self.frozen = []

    def close(self) -> None:
        self.thaw()
        with contextlib.suppress(subprocess.SubprocessError):
            self._pg_ctl("-m", "immediate", "stop")
        shutil.rmtree(self.base, ignore_errors=True)


class RedisInstance:
    """A Redis server of the drill's own, stoppable, freezable and restartable on its port."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if not binary:
            raise RuntimeError("redis-server not found: apt-get install redis-server")
        self.binary = binary
        self.base = Path(tempfile.mkdtemp(prefix="tpl-drill-redis-"))
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            redis_command(self.binary, self.port, self.base),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.05)

    def stop(self) -> None:
        assert self.process is not None
        self.process.terminate()
        self.process.wait(timeout=10)
        self.process = None

    def freeze(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)

    def close(self) -> None:
        if self.process is not None:
            self.thaw()
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None
        shutil.rmtree(self.base, ignore_errors=True)


# --------------------------------------------------------------------------- Sentry


@dataclass
class SentryReceiver:
    """A Sentry-compatible ingestion endpoint on loopback: accepts POST
    /api/<project>/envelope/ (gzip, deflate or plain, as sentry-sdk sends them) and keeps every
    event item it gets."""

    port: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)
    envelopes: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def dsn(self) -> str:
        return f"http://public@127.0.0.1:{self.port}/1"

    def wait_for_event(self, predicate: Any, timeout: float = 15) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in list(self.events):
                if predicate(event):
                    return event
            time.sleep(0.05)
        return None


def parse_envelope(data: bytes) -> list[tuple[dict[str, Any], bytes]]:
    """The items of a Sentry envelope: a header line, then per item a header line and a
    payload of the header's `length` (or up to the next newline)."""
    _, _, rest = data.partition(b"\n")
    items = []
    while rest.strip():
        item_header_line, _, rest = rest.partition(b"\n")
        item_header = json.loads(item_header_line)
        length = item_header.get("length")
        if length is None:
            payload, _, rest = rest.partition(b"\n")
        else:
            payload, rest = rest[:length], rest[length + 1 :]
        items.append((item_header, payload))
    return items


@contextlib.contextmanager
def sentry_receiver() -> Iterator[SentryReceiver]:
    receiver = SentryReceiver()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            encoding = self.headers.get("Content-Encoding", "")
            try:
                if not (self.path.startswith("/api/") and self.path.endswith("/envelope/")):
                    raise ValueError(f"unexpected path {self.path}")
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                elif encoding:
                    raise ValueError(f"unsupported Content-Encoding {encoding!r}")
                receiver.envelopes += 1
                for item_header, payload in parse_envelope(body):
                    if item_header.get("type") == "event":
                        receiver.events.append(json.loads(payload))
            except Exception as exc:  # recorded: the test fails on it with the reason
                receiver.errors.append(repr(exc))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# --------------------------------------------------------------------------- OpenTelemetry


@dataclass
class OtlpReceiver:
    """An OTLP/HTTP trace endpoint on loopback (POST /v1/traces, protobuf, plain or gzip) that
    decodes every span it receives with opentelemetry-proto. It can freeze (accept a request,
    read it, and never answer, as a collector stuck in GC or behind a dead proxy does) and go
    down (its port closed: connections refused)."""

    port: int = 0
    spans: list[dict[str, Any]] = field(default_factory=list)
    requests: int = 0
    errors: list[str] = field(default_factory=list)
    frozen: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)
    stop: Any = None  # closes the port (set by otlp_receiver)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_for_spans(self, predicate: Any, count: int = 1, timeout: float = 15) -> list[Any]:
        """The spans that satisfy predicate, once there are at least count of them (else what
        there is when the time runs out)."""
        deadline = time.monotonic() + timeout
        while True:
            found = [span for span in list(self.spans) if predicate(span)]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.05)


def _any_value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


def decode_traces(body: bytes) -> list[dict[str, Any]]:
    """The spans of an ExportTraceServiceRequest, each as a dict with its resource's
    attributes: ids in W3C hex, as the service writes them in its log lines."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    request = ExportTraceServiceRequest.FromString(body)
    spans = []
    for resource_spans in request.resource_spans:
        resource = {a.key: _any_value(a.value) for a in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(
                    {
                        "trace_id": span.trace_id.hex(),
                        "span_id": span.span_id.hex(),
                        "parent_span_id": span.parent_span_id.hex(),
                        "name": span.name,
                        "kind": span.kind,
                        "scope": scope_spans.scope.name,
                        "attributes": {a.key: _any_value(a.value) for a in span.attributes},
                        "status": span.status.code,
                        "resource": resource,
                    }
                )
    return spans


@contextlib.contextmanager
def otlp_receiver() -> Iterator[OtlpReceiver]:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceResponse,
    )

    receiver = OtlpReceiver()
    answer = ExportTraceServiceResponse().SerializeToString()
    connections: set[socket.socket] = set()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the exporter's session uses it

        def setup(self) -> None:
            super().setup()
            connections.add(self.connection)

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            receiver.requests += 1
            if receiver.frozen.is_set():
                receiver.released.wait()  # never answers; the connection closes at the end
                self.close_connection = True
                return
            try:
                if self.path != "/v1/traces":
                    raise ValueError(f"unexpected path {self.path}")
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                receiver.spans.extend(decode_traces(body))
            except Exception as exc:  # recorded: the test fails on it with the reason
                receiver.errors.append(repr(exc))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    server.daemon_threads = True
    receiver.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    closed = False

    def stop() -> None:
        nonlocal closed
        if not closed:
            closed = True
            receiver.released.set()
            server.shutdown()
            server.server_close()
            for connection in list(connections):  # kept-alive ones too: down is down
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)
            thread.join(timeout=5)

    receiver.stop = stop
    try:
        yield receiver
    finally:
        stop()
