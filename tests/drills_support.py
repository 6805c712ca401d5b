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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from .helpers import ROOT, free_port, json_lines
from .project import Project
from .servers import _as_postgres_user, _pg_bindir, initdb, redis_command

# A module written next to (not into) the generated project and put on PYTHONPATH: the generated
# application plus two routes the drills need. gunicorn gets it as its positional app argument,
# which wins over `wsgi_app` in the generated config (everything else comes from that config).
DRILL_APP = '''\
"""Drill routes on top of the generated application (written by the template's drills)."""

import asyncio
import os
import time
from pathlib import Path

import httpx
from fastapi import FastAPI, Request

from my_service.main import create_app


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


# --------------------------------------------------------------------------- raw HTTP


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes
    seconds: float

    def json(self) -> Any:
        return json.loads(self.body)


def http_request(
    port: int,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    timeout: float = 15,
    host: str = "127.0.0.1",
) -> Response:
    """One request on its own connection (Connection: close), parsed by hand: the drills send
    what a client library would refuse to send."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Connection: close"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body or method in {"POST", "PUT", "PATCH"}:
        lines.append(f"Content-Length: {len(body)}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return raw_request(port, head + body, timeout=timeout)


def raw_request(port: int, data: bytes, timeout: float = 15) -> Response:
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            # A server that refuses early may close before it has read everything.
            sock.sendall(data)
        chunks = []
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    raw = b"".join(chunks)
    seconds = time.monotonic() - start
    if not raw:
        raise ConnectionError(f"no response from 127.0.0.1:{port} ({seconds:.2f}s)")
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = _dechunk(body)
    return Response(int(status_line.split()[1]), headers, body, seconds)


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2 :]
    return out


def connection_refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


# --------------------------------------------------------------------------- the service


@dataclass
class Service:
    project: Project
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str, **kwargs: Any) -> Response:
        return http_request(self.port, "GET", path, **kwargs)

    def log_lines(self) -> list[dict[str, Any]]:
        """Every line the service wrote, each of which must be a JSON object."""
        lines = []
        for raw in json_lines(self.log_path):
            try:
                lines.append(json.loads(raw))
            except json.JSONDecodeError as exc:
                raise AssertionError(f"a log line is not JSON: {raw[:500]!r}") from exc
        return lines

    def lines_for(self, request_id: str) -> list[dict[str, Any]]:
        return [line for line in self.log_lines() if line.get("request_id") == request_id]

    def wait_for_log(self, predicate: Any, timeout: float = 5) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            found = [line for line in self.log_lines() if predicate(line)]
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.05)

    def worker_pids(self) -> set[int]:
        return children_of(self.process.pid)

    def kill_serving_worker(self, timeout: float = 15) -> int:
        """SIGKILL a worker that is serving now, and return its pid once the master has reaped
        it and reported the kill.

        A worker listed a moment ago may have left on its own since (max_requests recycles a
        busy worker every few seconds): signalling a stale pid fails, or lands on a worker
        that has already exited. So the victim is chosen at the moment of the kill, held by a
        pidfd (a reused pid cannot be hit), and the kill counts only when the master logs the
        worker as killed by the signal; a worker that had exited by itself was not serving, and
        another one is chosen."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            started = {
                str(line.get("event")) for line in self.log_lines() if "process [" in str(line)
            }
            for pid in sorted(self.worker_pids()):
                if f"Started server process [{pid}]" not in started:
                    continue  # still importing the application: not serving yet
                try:
                    pidfd = os.pidfd_open(pid)
                except ProcessLookupError:
                    continue  # reaped since the listing
                try:
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                except ProcessLookupError:
                    os.close(pidfd)
                    continue
                try:
                    while True:  # until the master has reaped it (then the pidfd names nobody)
                        try:
                            signal.pidfd_send_signal(pidfd, 0)
                        except ProcessLookupError:
                            break
                        if time.monotonic() > deadline:
                            raise AssertionError(f"worker {pid} not reaped after SIGKILL")
                        time.sleep(0.01)
                finally:
                    os.close(pidfd)
                # The master's own line, "Worker (pid:N) was sent SIGKILL!", written as it reaps.
                if self.wait_for_log(lambda line, pid=pid: _killed_line(line, pid), timeout=5):
                    return pid
            time.sleep(0.05)
        raise AssertionError(f"no serving worker could be killed in {timeout}s")

    def startups(self) -> int:
        """How many workers have finished their application startup (lifespan) so far."""
        return sum(
            1 for line in self.log_lines() if line.get("event") == "Application startup complete."
        )

    def wait_for_workers(
        self, count: int, startups: int | None = None, timeout: float = 30
    ) -> set[int]:
        """The master's worker processes, once there are `count` of them and at least
        `startups` (default: count) application startups have completed."""
        needed = count if startups is None else startups
        deadline = time.monotonic() + timeout
        while True:
            pids = self.worker_pids()
            if len(pids) == count and self.startups() >= needed:
                return pids
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{len(pids)} workers, {self.startups()} startups; expected "
                    f"{count} and {needed}:\n" + self.log_path.read_text()[-4000:]
                )
            time.sleep(0.1)


def _killed_line(line: dict[str, Any], pid: int) -> bool:
    event = str(line.get("event"))
    return f"(pid:{pid})" in event and "SIGKILL" in event


def children_of(pid: int) -> set[int]:
    children = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may contain spaces, so split after the last ')'.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            children.add(int(entry.name))
    return children


def drill_app_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "drill_app"
    directory.mkdir(exist_ok=True)
    (directory / "drill_app.py").write_text(DRILL_APP)
    return directory


@contextlib.contextmanager
def service(
    project: Project,
    env: dict[str, str | None],
    log_dir: Path,
    app: str | None = None,
    extra_path: Path | None = None,
    cwd: Path | None = None,
    timeout: float = 90,
) -> Iterator[Service]:
    """`gunicorn -c gunicorn.conf.py [app]` in the project (the generated config as is), bound
    by GUNICORN_CMD_ARGS to a free loopback port; waits for /health/live; stops it afterwards
    (SIGTERM, then SIGKILL of its process group if it outlives the graceful timeout)."""
    project.sync()
    port = free_port()
    log_path = log_dir / f"gunicorn-{port}.log"
    full_env = {**os.environ, "GUNICORN_CMD_ARGS": f"--bind 127.0.0.1:{port}"}
    if extra_path:
        full_env["PYTHONPATH"] = str(extra_path)
    for key, value in env.items():
        if value is None:
            full_env.pop(key, None)
        else:
            full_env[key] = value
    config = project.path / "gunicorn.conf.py"
    cmd = [str(project.bin / "gunicorn"), "-c", str(config), *([app] if app else [])]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            cmd,
            cwd=cwd or project.path,
            env=full_env,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    running = Service(project, process, port, log_path)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise AssertionError(
                    f"gunicorn exited {process.returncode}:\n" + log_path.read_text()[-6000:]
                )
            try:
                if running.get("/health/live", timeout=2).status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"gunicorn did not answer in {timeout}s:\n" + log_path.read_text()[-6000:]
                )
            time.sleep(0.2)
        yield running
    finally:
        stop_process_group(process)


def stop_process_group(process: subprocess.Popen[Any], timeout: float = 40) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=timeout)
    # Whatever is left of the group (workers of a killed master) goes too.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    if process.poll() is None:
        process.wait()


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
