"""A bounded HTTP/1.1 load generator for the drills, run as its own process:

    python tests/drills_load.py --port 8000 --path /api/v1/info --seconds 10 --connections 32

Each connection sends one request at a time with keep-alive (reconnecting when the server closes,
as a client or proxy would). Every request counts: a response with status 200 is a success;
anything else is a failure, recorded with its reason (the status, or the socket error and
whether any byte of the response had arrived). A request lost without any response byte on a
connection that had already been answered is sent again once on a new connection, as nginx
does for its upstream keep-alive connections; those are reported apart (`lost_in_flight`,
`retried_ok`). Prints one JSON object.

With --stop-file PATH it stops as soon as that file exists (--seconds is then an upper bound):
for a drill whose end is an event, not a duration. --host sets the Host header (a balancer in
front may route on it, the service checks it). --tls-ca FILE speaks HTTPS, trusting that
certificate alone, with the Host as the server name (SNI): for load through nginx's TLS site.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import pathlib
import ssl
import time


class Stats:
    def __init__(self) -> None:
        self.sent = 0
        self.ok = 0
        self.failed = 0
        self.reasons: collections.Counter[str] = collections.Counter()
        self.failure_times: list[float] = []
        self.connects = 0
        self.max_latency = 0.0
        self.lost_in_flight: collections.Counter[str] = collections.Counter()
        self.retried_ok = 0


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = 0
    close = False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "connection" and value.strip().lower() == "close":
            close = True
    await reader.readexactly(length)
    return status, close


class Deadline:
    """When the connections stop sending: --seconds after the start, or earlier once the
    --stop-file exists (watch)."""

    def __init__(self, end: float) -> None:
        self.end = end

    async def watch(self, stop_file: str | None) -> None:
        if stop_file is None:
            return
        path = pathlib.Path(stop_file)
        while time.monotonic() < self.end:
            if path.exists():
                self.end = time.monotonic()
                return
            await asyncio.sleep(0.05)


async def connection(
    args: argparse.Namespace, stats: Stats, start: float, deadline: Deadline
) -> None:
    request = (
        f"GET {args.path} HTTP/1.1\r\nHost: {args.host}\r\nUser-Agent: drills-load\r\n\r\n"
    ).encode()
    tls: dict[str, object] = {}
    if args.tls_ca:
        tls = {"ssl": ssl.create_default_context(cafile=args.tls_ca), "server_hostname": args.host}
    writer: asyncio.StreamWriter | None = None
    reader: asyncio.StreamReader | None = None
    answered_on_connection = 0
    retrying = False
    while time.monotonic() < deadline.end or retrying:
        if writer is None:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", args.port, **tls)
                stats.connects += 1
                answered_on_connection = 0
            except OSError as exc:
                stats.sent += 0 if retrying else 1
                stats.failed += 1
                retrying = False
                stats.reasons[f"connect: {type(exc).__name__}"] += 1
                stats.failure_times.append(time.monotonic() - start)
                await asyncio.sleep(0.01)
                continue
        assert reader is not None
        if not retrying:
            stats.sent += 1
        sent_at = time.monotonic()
        try:
            writer.write(request)
            await writer.drain()
            status, close = await asyncio.wait_for(read_response(reader), args.timeout)
        except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
            writer.close()
            writer = None
            nothing_received = isinstance(exc, ConnectionResetError) or (
                isinstance(exc, asyncio.IncompleteReadError) and not exc.partial
            )
            kind = type(exc).__name__
            if isinstance(exc, asyncio.IncompleteReadError):
                kind = "closed mid-response" if exc.partial else "closed before any response byte"
            if nothing_received and answered_on_connection and not retrying and args.retry:
                # What nginx does for a request lost on a reused upstream keep-alive connection
                # (and RFC 9110 9.2.2 allows for an idempotent request): send it again, once,
                # on a new connection. Counted apart, so the report shows the raw losses too.
                stats.lost_in_flight[kind] += 1
                retrying = True
                continue
            stats.failed += 1
            stats.reasons[kind + (" (after a retry)" if retrying else "")] += 1
            stats.failure_times.append(time.monotonic() - start)
            retrying = False
            continue
        if retrying:
            stats.retried_ok += 1 if status == 200 else 0
        retrying = False
        answered_on_connection += 1
        stats.max_latency = max(stats.max_latency, time.monotonic() - sent_at)
        if status == 200:
            stats.ok += 1
        else:
            stats.failed += 1
            stats.reasons[f"status {status}"] += 1
            stats.failure_times.append(time.monotonic() - start)
        if close:
            writer.close()
            writer = None
    if writer is not None:
        writer.close()


async def main(args: argparse.Namespace) -> dict[str, object]:
    stats = Stats()
    start = time.monotonic()
    deadline = Deadline(start + args.seconds)
    await asyncio.gather(
        deadline.watch(args.stop_file),
        *(connection(args, stats, start, deadline) for _ in range(args.connections)),
    )
    elapsed = time.monotonic() - start
    return {
        "seconds": round(elapsed, 2),
        "connections": args.connections,
        "sent": stats.sent,
        "ok": stats.ok,
        "failed": stats.failed,
        "success_ratio": stats.ok / stats.sent if stats.sent else 0.0,
        "requests_per_second": round(stats.sent / elapsed, 1),
        "reasons": dict(stats.reasons),
        "lost_in_flight": dict(stats.lost_in_flight),
        "retried_ok": stats.retried_ok,
        "failure_times_s": [round(t, 3) for t in stats.failure_times[:100]],
        "connects": stats.connects,
        "max_latency_s": round(stats.max_latency, 3),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/api/v1/info")
    parser.add_argument("--host", default="127.0.0.1", help="the Host header sent")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=10)
    parser.add_argument("--stop-file", help="stop once this file exists")
    parser.add_argument("--tls-ca", help="HTTPS, trusting this certificate (PEM) alone")
    parser.add_argument(
        "--no-retry",
        dest="retry",
        action="store_false",
        help="count a request lost on a reused connection as failed at once",
    )
    print(json.dumps(asyncio.run(main(parser.parse_args()))))
