"""What the process knows about its own life: whether it has begun to shut down.

gunicorn stops a worker with SIGTERM (SIGQUIT or SIGINT for a fast exit); uvicorn then closes
its listener, so new connections are refused, and waits for in-flight requests before the
lifespan shutdown runs. Connections already open (a proxy's kept-alive ones) may still carry a
readiness probe: it must fail from the first moment of the drain, so the balancer stops sending
traffic, which the lifespan shutdown would report too late. The signal handlers installed by
the server are wrapped, not replaced: its own behaviour is unchanged.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType

from fastapi import Request

SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)


@dataclass
class Lifecycle:
    draining: bool = False

    @contextmanager
    def watch_shutdown_signals(self) -> Iterator[None]:
        """Mark the process as draining when the server is told to stop."""
        if threading.current_thread() is not threading.main_thread():
            # Only the main thread may set signal handlers, and only it gets signals: an app
            # run in another thread (Starlette's TestClient, an embedding server) has none to see.
            yield
            return
        previous = {sig: signal.getsignal(sig) for sig in SHUTDOWN_SIGNALS}

        def handler(signum: int, frame: FrameType | None) -> None:
            self.draining = True
            chained = previous[signal.Signals(signum)]
            if callable(chained):
                chained(signum, frame)
            elif chained == signal.SIG_DFL:
                signal.signal(signum, signal.SIG_DFL)
                signal.raise_signal(signum)

        for sig in SHUTDOWN_SIGNALS:
            signal.signal(sig, handler)
        try:
            yield
        finally:
            for sig, original in previous.items():
                signal.signal(sig, original)


async def get_lifecycle(request: Request) -> Lifecycle:
    # async: a plain def dependency would run in FastAPI's thread pool (see get_settings).
    lifecycle: Lifecycle = request.app.state.lifecycle
    return lifecycle
