"""uvicorn's HTTP protocol as the workers run it: gunicorn's limits, and a shutdown losing nothing.

A worker stops on SIGTERM (a restart, a deploy, a scale-down), on HUP (a reload) and after
`max_requests` (gunicorn.conf.py). uvicorn then stops listening and, in the same turn of its event
loop, closes every connection that is not answering a request. A connection it accepted a moment
before may already hold a request, sent but not yet read: uvicorn closes it unanswered, and the
client (nginx: 502) loses a request it had every reason to think was taken. `HttpProtocol` reads
what has already arrived before it closes an idle connection, and answers such a request, closing
the connection after it. A connection on which nothing has arrived is closed as before.

gunicorn.conf.py installs it in each worker (`post_worker_init`).
"""

from __future__ import annotations

from typing import Any

from .http_limits import LimitedHttpToolsProtocol


class HttpProtocol(LimitedHttpToolsProtocol):
    """The limited protocol (http_limits.py), with a shutdown that serves requests already sent."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._stopping = False

    def shutdown(self) -> None:
        """Called by uvicorn once the worker no longer listens."""
        self._stopping = True
        if self.cycle is not None and not self.cycle.response_complete:
            super().shutdown()  # answered, then closed
            return
        # Idle, as far as this worker has read. The event loop reads what has arrived when it
        # next polls: two hops of call_soon are run on either side of a poll, with asyncio and
        # with uvloop alike, whatever the machine's load.
        self.loop.call_soon(self.loop.call_soon, self._close_if_idle)

    def _close_if_idle(self) -> None:
        if self.cycle is None or self.cycle.response_complete:
            self.transport.close()
        # Else a request has arrived meanwhile: answered, then closed (on_headers_complete).

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        if self._stopping and self.cycle is not None:
            self.cycle.keep_alive = False
