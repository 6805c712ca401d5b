"""gunicorn's request line and header limits, applied to uvicorn's HTTP parser.

gunicorn's `limit_request_line`, `limit_request_fields` and `limit_request_field_size` guard
gunicorn's own parser only: uvicorn's worker does not pass them on, and uvicorn's httptools
parser has no limit of its own. Without this module one request with a 100 MB header held a
worker's event loop until gunicorn killed it, and a 10 MB header was served as if nothing was
wrong. `LimitedHttpToolsProtocol` bounds what is buffered while the request head is read (the
longest head the three limits allow) and checks the three limits once the head is complete,
before the application sees the request: a longer request target is answered 414, too many or
too long header fields 431. Like every other error, the answer is JSON with a request id, and the
log line of the refusal carries the same id. Each refusal is counted in the request metrics
(route `unmatched`), as is uvicorn's 400 for a request it cannot parse.

gunicorn.conf.py installs it in each worker (`post_worker_init`) with the configured limits.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, ClassVar

import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from .metrics import record_refused

# After a refusal, what the client still sends is read and dropped for up to this long before
# the connection closes: closing with unread data would reset the connection, and the client
# would lose the answer it was sent (the "lingering close" of nginx and Apache).
LINGER_SECONDS = 2.0


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, refusing request heads beyond gunicorn's limits.

    A limit of 0 means unlimited, as in gunicorn.
    """

    limit_request_line: ClassVar[int] = 4094
    limit_request_fields: ClassVar[int] = 100
    limit_request_field_size: ClassVar[int] = 8190

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True
        self._head_bytes = 0  # at least the size of the request head being read
        self._chunk_bytes = 0  # the size of the chunk of data being parsed
        self._refused = False
        self._deferred_refusal: tuple[int, str, str | None] | None = None
        # When the parser began the request being read (None: not yet), for the metrics'
        # latency of a refusal.
        self._head_started: float | None = None
        # The limits are set once per worker, before it serves (post_worker_init).
        self._max_head_bytes = self.max_head_bytes()

    @classmethod
    def max_head_bytes(cls) -> int | None:
        """The longest request head (request line and header fields) that keeps every limit."""
        limits = (cls.limit_request_line, cls.limit_request_fields, cls.limit_request_field_size)
        if not all(limits):
            return None
        return (
            cls.limit_request_line
            + 2
            + cls.limit_request_fields * (cls.limit_request_field_size + 2)
            + 2
        )

    def _refuse(self, status: int, detail: str, method: str | None = None) -> None:
        """Refuse the request being read; `method` once its head has been read."""
        self._refused = True
        if self.cycle is not None and not self.cycle.response_complete:
            # Pipelined behind a request still being answered: answered in turn, once the
            # requests before it are (on_response_complete).
            self._deferred_refusal = (status, detail, method)
        else:
            self._answer_refusal(status, detail, method)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        deferred = self._deferred_refusal
        if deferred and not self.pipeline and self.cycle.response_complete:
            self._deferred_refusal = None
            if not self.transport.is_closing():
                self._answer_refusal(*deferred)

    def _answer_refusal(self, status: int, detail: str, method: str | None) -> None:
        record_refused(method, status, self._started())
        request_id = uuid.uuid4().hex
        body = orjson.dumps({"detail": detail, "request_id": request_id})
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: " + str(len(body)).encode() + b"\r\n",
            b"x-request-id: " + request_id.encode() + b"\r\n",
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)
        if self.transport.can_write_eof():
            self.transport.write_eof()  # the client reads the answer, then sees the end
            self.loop.call_later(LINGER_SECONDS, self.transport.close)
        else:
            self.transport.close()
        self.logger.warning(
            "request refused",
            extra={
                "status": status,
                "detail": detail,
                "request_id": request_id,
                "client": self.client[0] if self.client else None,
            },
        )

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # dropped: lingering until the client closes or LINGER_SECONDS pass
        self._chunk_bytes = len(data)
        if self._in_head:
            # httptools buffers a header until it is complete: bound what it may buffer.
            self._head_bytes += len(data)
            limit = self._max_head_bytes
            if limit is not None and self._head_bytes > limit:
                self._refuse(431, "Request Header Fields Too Large")
                return
        super().data_received(data)

    # What uvicorn does when the parser fails or sees an upgrade; after a refusal the rest of the
    # same data may still reach them (the parser goes on after the callback that refused): they
    # would write after the refusal's end of stream and die on a request that was never handed
    # over, so they are skipped.

    def send_400_response(self, msg: str) -> None:
        if not self._refused:
            if self._in_head:
                # Counted here only when no request was handed to the application: one whose
                # body fails to parse (a malformed chunk) is counted by the application's
                # middleware, as it answered it.
                record_refused(None, 400, self._started())
            super().send_400_response(msg)

    def handle_websocket_upgrade(self) -> None:
        if not self._refused:
            super().handle_websocket_upgrade()

    # Parser callbacks. The request line and the header fields are checked once the head is
    # complete (data_received bounds what is buffered until then), before the request is handed
    # to the application: one check per request, not a Python call per header field. After a
    # refusal the parser may still report what followed in the same chunk of data: it is ignored
    # (the connection is closing).

    def _started(self) -> float:
        """When the request being refused began (now, if the parser had not begun it)."""
        return time.perf_counter() if self._head_started is None else self._head_started

    def on_message_begin(self) -> None:
        self._head_started = time.perf_counter()
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._in_head = False
        if self.limit_request_line and len(self.url) > self.limit_request_line:
            refusal = (414, "URI Too Long")
        elif self.limit_request_fields and len(self.headers) > self.limit_request_fields:
            refusal = (431, "Too many request header fields")
        elif (
            self.limit_request_field_size
            # No field is longer than the whole head: most requests skip the loop.
            and self._head_bytes > self.limit_request_field_size
            and any(
                len(name) + len(value) + 2 > self.limit_request_field_size
                for name, value in self.headers
            )
        ):
            refusal = (431, "Request header field too large")
        else:
            super().on_headers_complete()
            return
        self._refuse(*refusal, self.parser.get_method().decode("latin-1"))

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        # The next request's head may already be in this chunk (pipelining): counting the whole
        # chunk keeps _head_bytes an upper bound of that head's size.
        self._in_head, self._head_bytes = True, self._chunk_bytes
        self._head_started = None
        super().on_message_complete()
