"""In-process cost of each layer of the generated app, run by the generated project's Python.

`python layers.py BARE_DIR PATH...` prints JSON: CPU microseconds per request through the ASGI
app (no server, no network) for the bare app, the bare app with the service's routers
(`routers.py`), the generated app without its own middleware, then with each middleware added in
turn (outermost first, as a request meets them), the whole app without its access line
(ACCESS_LOG=false), and the whole app with and without its metrics' two steps (written to files,
as under gunicorn). Each request runs in its own task, as under uvicorn. The variants are
interleaved in many short batches; the 10th percentile of the batches is reported, the batch least
disturbed by other processes on the machine.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any

BATCHES = 40
PER_BATCH = 200


class _Silent:
    def info(self, *args: Any, **kwargs: Any) -> None:
        pass


class _NotCounting:
    def started(self) -> None:
        pass

    def finished(self) -> None:
        pass


def _none(*args: Any) -> None:
    pass


def _swapping(app: Any, module: Any, steps: tuple[Any, Any]) -> Any:
    """app, with the middleware module's IN_FLIGHT and record_request set to steps while it
    handles a request (requests run one at a time here)."""

    async def swapped(scope: Any, receive: Any, send: Any) -> None:
        saved = module.IN_FLIGHT, module.record_request
        module.IN_FLIGHT, module.record_request = steps
        try:
            await app(scope, receive, send)
        finally:
            module.IN_FLIGHT, module.record_request = saved

    return swapped


def http_scope(path: str, *headers: tuple[bytes, bytes]) -> dict[str, Any]:
    """The ASGI scope of `GET path` as uvicorn makes it, with a client's usual headers (and
    these)."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 50000),
        "scheme": "http",
        "method": "GET",
        "root_path": "",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [
            (b"host", b"127.0.0.1:8000"),
            (b"user-agent", b"bench"),
            (b"accept", b"*/*"),
            *headers,
        ],
    }


async def _measure(apps: dict[str, Any], path: str) -> dict[str, float]:
    scope = http_scope(path)
    statuses: dict[str, int] = {}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    def sender(name: str) -> Any:
        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses[name] = message["status"]

        return send

    async def one(app: Any, send: Any) -> None:
        await app(dict(scope, headers=list(scope["headers"])), receive, send)

    sends = {name: sender(name) for name in apps}
    for name, app in apps.items():  # builds each middleware stack, warms caches
        for _ in range(50):
            await asyncio.create_task(one(app, sends[name]))
    bad = {name: status for name, status in statuses.items() if status != 200}
    if bad:
        raise SystemExit(f"{path}: not 200: {bad}")
    samples: dict[str, list[float]] = {name: [] for name in apps}
    for _ in range(BATCHES):
        for name, app in apps.items():
            start = time.thread_time()
            for _ in range(PER_BATCH):
                await asyncio.create_task(one(app, sends[name]))
            samples[name].append((time.thread_time() - start) / PER_BATCH * 1e6)
    return {name: sorted(values)[len(values) // 10] for name, values in samples.items()}


def main() -> None:
    bare_dir, paths = sys.argv[1], sys.argv[2:]
    sys.path.insert(0, bare_dir)
    # The metrics as under gunicorn: each worker's values in files of its own (multiprocess
    # mode, chosen when prometheus_client is imported).
    directory = tempfile.mkdtemp(prefix="bench-metrics-", dir="/dev/shm")  # removed at exit
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    from app import app as bare  # the bare app
    from my_service import middleware
    from my_service.main import create_app
    from my_service.settings import load_settings
    from routers import app as routers  # the bare app with the service's routers

    def generated(keep: int | None, silent: bool = False) -> Any:
        settings = load_settings()
        if silent and "access_log" in type(settings).model_fields:
            # Without the access line as an operator turns it off (ACCESS_LOG=false).
            app = create_app(settings.model_copy(update={"access_log": False}))
        else:
            app = create_app(settings)
            if silent:  # a template from before ACCESS_LOG (--compare): the line silenced
                app.build_middleware_stack = _silencing(app.build_middleware_stack)
        if keep is not None:
            app.user_middleware = app.user_middleware[:keep]
        return app

    def _silencing(build: Any) -> Any:
        def wrapped() -> Any:
            stack = build()
            layer = stack
            while layer is not None:
                if hasattr(layer, "access_logger"):
                    layer.access_logger = _Silent()
                layer = getattr(layer, "app", None)
            return stack

        return wrapped

    names = [m.cls.__name__ for m in create_app().user_middleware]
    apps: dict[str, Any] = {
        "bare app": bare,
        "bare, same routers": routers,
        "generated, no middleware of its own": generated(0),
    }
    for i, name in enumerate(names, start=1):
        apps[f"+ {name}"] = generated(i)
    apps["all, without the access line"] = generated(None, silent=True)
    # The metrics' two steps in the middleware, kept or replaced by no-ops around each request
    # (the same wrapper for both, so that its own cost cancels out).
    real = (middleware.IN_FLIGHT, middleware.record_request)
    apps["all, metrics swapped in"] = _swapping(generated(None), middleware, real)
    apps["all, without the metrics"] = _swapping(
        generated(None), middleware, (_NotCounting(), _none)
    )
    try:
        import uvloop  # what uvicorn runs on when it is installed (uvicorn[standard])

        run: Any = uvloop.run
    except ImportError:
        run = asyncio.run
    results = {path: run(_measure(apps, path)) for path in paths}
    print(json.dumps({"layers": names, "results": results}))


if __name__ == "__main__":
    main()
