"""A generated service under gunicorn, as the suite starts it (serve), talks to it (raw HTTP
on loopback: the drills send what a client library would refuse to send) and watches it (its
JSON log, its worker processes)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .helpers import environment, free_port, json_lines, started
from .project import Project


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


@dataclass
class Service:
    project: Project
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    metrics_port: int  # the master's metrics endpoint (METRICS_BIND)

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


def _live(port: int) -> bool:
    try:
        return http_request(port, "GET", "/health/live", timeout=2).status == 200
    except OSError:
        return False


@contextlib.contextmanager
def serve(
    project: Project,
    env: Mapping[str, str | None],
    log_dir: Path | None = None,
    app: str | None = None,
    extra_path: Path | None = None,
    cwd: Path | None = None,
    bind_via: str = "env",
    args: tuple[str, ...] = (),
    timeout: float = 90,
) -> Iterator[Service]:
    """`gunicorn -c gunicorn.conf.py [args] [app]` in the project (the generated config as is)
    on a free loopback port, yielded once /health/live answers 200; stopped afterwards (see
    helpers.stop).

    bind_via: "env" passes --bind in GUNICORN_CMD_ARGS, "cli" on the command line (both must
    win over the config's bind); METRICS_BIND is another free port. env adds to the
    environment; a None value removes a variable.
    extra_path goes on PYTHONPATH (the drills' app module)."""
    project.sync()
    port = free_port()
    metrics_port = free_port()
    log_path = (log_dir or project.path) / f"gunicorn-{port}.log"
    bind = ["--bind", f"127.0.0.1:{port}"]
    changes: dict[str, str | None] = {"METRICS_BIND": f"127.0.0.1:{metrics_port}", **env}
    if extra_path:
        changes["PYTHONPATH"] = str(extra_path)
    if bind_via == "env":
        changes["GUNICORN_CMD_ARGS"] = " ".join(bind)
    else:
        args = (*bind, *args)
    config = project.path / "gunicorn.conf.py"
    cmd = [str(project.bin / "gunicorn"), "-c", str(config), *args, *([app] if app else [])]
    with started(
        cmd, cwd or project.path, environment(changes), log_path, lambda: _live(port), timeout
    ) as process:
        yield Service(project, process, port, log_path, metrics_port)
