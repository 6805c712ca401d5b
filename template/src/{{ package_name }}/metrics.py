"""The service's Prometheus metrics, as each worker records them.

Requests are counted per route template (`/api/v1/items/{item_id}`, never the raw path), method
and status, with their latency and the number in flight; readiness is the last answer of
`/health/ready`. A path that matches no route is counted under the one label `unmatched`, and a
method outside the usual ones under `other`: a scan of random paths or methods adds no series. A
request the HTTP layer refuses before the application sees it (http_limits.py: a request line or
header over gunicorn's limits, 414 or 431; a request the server cannot parse, 400) is counted
under `unmatched` too.

Under gunicorn each worker writes its values to files of its own in PROMETHEUS_MULTIPROC_DIR
(prometheus_client's multiprocess mode, chosen when it is imported); the master sums them and
serves them on METRICS_BIND, never on the service's port (metrics_server.py). Elsewhere (the
tests, an embedding server) they live in this process' default registry.
"""

from __future__ import annotations

import asyncio
import functools
import math
import mmap
import os
import time
from bisect import bisect_left
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import structlog
from prometheus_client import Counter, Gauge, Histogram, mmap_dict, values
from starlette.types import Scope

logger = structlog.get_logger(__name__)

UNMATCHED = "unmatched"
OTHER_METHOD = "other"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Seconds, for a web API: most answers take milliseconds; the last bound is gunicorn's worker
# timeout (30 s), past which no request lives.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

REQUESTS = Counter(
    "http_requests",
    "HTTP requests answered, by route template, method and status.",
    ["route", "method", "status"],
)
LATENCY = Histogram(
    "http_request_duration_seconds",
    "Time from the request's arrival to its last response byte, by route template and method.",
    ["route", "method"],
    buckets=LATENCY_BUCKETS,
)
_IN_FLIGHT = Gauge(
    "http_requests_in_flight",
    "HTTP requests being handled now (sampled at most half a second ago).",
    multiprocess_mode="livesum",  # summed over the live workers
)
# service_ready: made by this process' first /health/ready answer (record_readiness). A gauge's
# series exists, at 0, from the moment the gauge does (under gunicorn, from a worker's first
# metric): made at import, it said "not ready" for every worker that nobody had asked.
_ready: Gauge | None = None

# How long the in-flight gauge may lag behind the count.
PUBLISH_DELAY = 0.5


def record_readiness(ready: bool) -> None:
    """The answer /health/ready just gave, as service_ready: 1 or 0. No series until a worker
    has answered it once, so that a worker nothing asks reports nothing rather than 0."""
    global _ready
    if _ready is None:
        _ready = Gauge(
            "service_ready",
            "1 if the last /health/ready answer was 200, else 0 (the latest answer of any live "
            "worker).",
            # The latest answer, whichever worker gave it: the lowest over the workers kept the
            # 503 of a worker not asked since an outage (an uptime check's keep-alive connection
            # lands on one worker), and the service stayed "not ready" once ready again.
            multiprocess_mode="livemostrecent",
        )
    _ready.set(1 if ready else 0)


class InFlight:
    """The requests this worker is handling: counted in memory, written to the gauge at most
    PUBLISH_DELAY after a change. Writing the gauge's file as each request starts and ends
    cost as much as the rest of the metrics together; a gauge is a sample anyway."""

    def __init__(self) -> None:
        self.count = 0
        self._pending: asyncio.AbstractEventLoop | None = None  # the loop a write is due in

    def started(self) -> None:
        self.count += 1
        self._changed()

    def finished(self) -> None:
        self.count -= 1
        self._changed()

    def _changed(self) -> None:
        loop = asyncio.get_running_loop()
        if self._pending is not loop:  # none due (or due in a loop that has gone: tests)
            self._pending = loop
            loop.call_later(PUBLISH_DELAY, self._publish)

    def _publish(self) -> None:
        self._pending = None
        _IN_FLIGHT.set(self.count)


IN_FLIGHT = InFlight()


# Each request's counter, latency sum and bucket are written in place in the worker's file
# (_InPlace), with prometheus_client's internals (checked against 0.21 to 0.26); each series
# checks them once, when it is made, and goes through the library's own calls if they are not
# as expected (_Series, with one warning per worker): a release that renames or restructures
# them costs a few microseconds per request, not a failed request.

# prometheus_client's multiprocess mode, as it chose it when imported (values in files).
_MULTIPROCESS = values.ValueClass is not values.MutexValue
# The library's packing of a value into its files, if this release has it.
_pack_two_doubles: Any = getattr(mmap_dict, "_pack_two_doubles", None)
# The histogram's bounds, as the library completes them.
_BOUNDS = (*LATENCY_BUCKETS, math.inf)


class _FileValue:
    """One value of this worker's metric file (multiprocess mode), written in place.

    prometheus_client's own write (`MmapedValue.inc`) takes its lock, asks for the process id
    (to notice a fork) and looks the value's key up in its file on every call, and
    `Histogram.observe()` checks its labels and walks the buckets: three such writes per request
    were most of the metrics' cost. Here the value's place in the file is found once, and each
    write packs the number there, in the library's own format (its `_pack_two_doubles`), keeping
    the library's copy (what `get()` returns) in step. Only `record_request` writes these
    series, from the event loop's thread; a forked process starts with none (below).
    """

    __slots__ = ("_file", "_position", "_value")

    def __init__(self, value: Any, file: Any, position: int) -> None:
        self._value = value
        self._file = file
        self._position = position

    @classmethod
    def of(cls, value: Any) -> _FileValue | None:
        """The value's writer, if the value is laid out as expected: its number in `_value`, its
        file in `_file` (mapped in `_m`, the number's place by `_key` in `_positions`)."""
        if not callable(getattr(value, "get", None)):
            return None
        value.get()  # in a forked process: the library moves every value to files of its own
        file = getattr(value, "_file", None)
        positions = getattr(file, "_positions", None)
        key = getattr(value, "_key", None)
        position = positions.get(key) if isinstance(positions, dict) else None
        if (
            isinstance(getattr(value, "_value", None), float)
            and isinstance(getattr(file, "_m", None), mmap.mmap)
            and isinstance(position, int)
        ):
            return cls(value, file, position)
        return None

    def inc(self, amount: float) -> None:
        value = self._value
        value._value += amount
        # The file's current mapping (it is remapped when the file grows).
        _pack_two_doubles(self._file._m, self._position, value._value, 0.0)


class _InPlace:
    """What one request of a (route, method, status) updates, written in place: the counter,
    the latency sum and the bucket of its duration, as `Counter.inc()` and
    `Histogram.observe()` would."""

    __slots__ = ("_buckets", "_requests", "_sum")

    def __init__(self, requests: _FileValue, sum_: _FileValue, buckets: list[_FileValue]) -> None:
        self._requests = requests
        self._sum = sum_
        self._buckets = buckets

    @classmethod
    def of(cls, requests: Counter, latency: Histogram) -> _InPlace | None:
        """The series' writers, if the labelled metrics are laid out as expected: the counter's
        value in `_value`, the histogram's in `_sum` and `_buckets` (one per bound of
        `_upper_bounds`), each a `_FileValue`."""
        buckets = getattr(latency, "_buckets", None)
        if (
            not callable(_pack_two_doubles)
            or getattr(latency, "_upper_bounds", None) != list(_BOUNDS)
            or not isinstance(buckets, list)
            or len(buckets) != len(_BOUNDS)
        ):
            return None
        numbers = [getattr(requests, "_value", None), getattr(latency, "_sum", None), *buckets]
        writers = [writer for number in numbers if (writer := _FileValue.of(number)) is not None]
        if len(writers) != len(numbers):
            return None
        return cls(writers[0], writers[1], writers[2:])

    def record(self, duration: float) -> None:
        self._requests.inc(1.0)
        self._sum.inc(duration)
        # The first bucket whose bound is at least the duration, as observe() counts it.
        self._buckets[bisect_left(_BOUNDS, duration)].inc(1.0)


class _Series:
    """What one request of a (route, method, status) updates, through prometheus_client's own
    calls: in memory (no file to write in place), or if its internals are not as expected."""

    __slots__ = ("_latency", "_requests")

    def __init__(self, requests: Counter, latency: Histogram) -> None:
        self._requests = requests
        self._latency = latency

    def record(self, duration: float) -> None:
        self._requests.inc()
        self._latency.observe(duration)


@functools.cache  # once: at the first series that needs it, in each worker
def _warn_not_in_place() -> None:
    try:
        installed = version("prometheus-client")
    except PackageNotFoundError:  # installed without its metadata (vendored, a zip app)
        installed = "unknown"
    logger.warning(
        "metrics written through prometheus_client's own calls: its internals are not those "
        "they are written in place with (a few microseconds more per request)",
        prometheus_client=installed,
    )


def _series_of(requests: Counter, latency: Histogram) -> _InPlace | _Series:
    """The series' writer: in place if it can be, else through the library's own calls."""
    if not _MULTIPROCESS:
        return _Series(requests, latency)
    in_place = _InPlace.of(requests, latency)
    if in_place is None:
        _warn_not_in_place()
        return _Series(requests, latency)
    return in_place


# The series of each (route, method, status): bounded by the application's routes, as the
# series are. Made in the process that records (a forked worker makes its own).
_series: dict[tuple[str, str, int], _InPlace | _Series] = {}
os.register_at_fork(after_in_child=_series.clear)


def record_request(scope: Scope, status: int, start: float) -> None:
    """Count an answered request and its latency since `start` (a time.perf_counter() value)."""
    duration = time.perf_counter() - start
    # FastAPI puts the route it matched (also for a 405: right path, wrong method) in the
    # scope; nothing there means no route, or a refusal before routing (413, a bad Host). Its
    # path includes an APIRouter(prefix=...), not a prefix given to include_router().
    route = scope.get("route")
    method = scope["method"]
    key = (
        UNMATCHED if route is None else route.path,
        method if method in METHODS else OTHER_METHOD,
        status,
    )
    series = _series.get(key)
    if series is None:
        series = _new_series(key)
    series.record(duration)


def record_refused(method: str | None, status: int, start: float) -> None:
    """Count a request the HTTP layer refused before the application saw it (http_limits.py:
    414, 431, and the server's 400 for a request it cannot parse), under `unmatched`, with its
    method when its head was read far enough to have one (else `other`)."""
    duration = time.perf_counter() - start
    key = (UNMATCHED, method if method in METHODS else OTHER_METHOD, status)
    (_series.get(key) or _new_series(key)).record(duration)


def _new_series(key: tuple[str, str, int]) -> _InPlace | _Series:
    route, method, status = key
    series = _series[key] = _series_of(
        REQUESTS.labels(route, method, str(status)), LATENCY.labels(route, method)
    )
    return series
