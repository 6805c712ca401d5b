"""OpenTelemetry tracing of a running generated service (issue 13), a drill like the Sentry one:
the all-enabled service under gunicorn exports to a loopback OTLP/HTTP receiver that decodes
what it gets. The caller's trace is continued, the spans carry the route template and the
request id, SQL and Redis calls are child spans, the log lines carry the same ids; a collector
that is frozen or down slows no request and fails none; spans still queued are exported at
SIGTERM."""

from __future__ import annotations

import secrets
import signal
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pytest_copier import CopierFixture

from .drills_support import OtlpReceiver, otlp_receiver, report
from .helpers import ALL_ENABLED
from .project import Project, project_for
from .servers import Postgres, Redis
from .services import Service, http_request, serve

COMBO = ALL_ENABLED["docker"]
pytestmark = [pytest.mark.drills, pytest.mark.xdist_group(COMBO.id)]

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
SERVER, CLIENT = 2, 3  # OTLP's SpanKind values
EXPORT_TIMEOUT = 3.0  # tracing.EXPORT_TIMEOUT as generated
# A request must never wait for the exporter: far below the export timeout it would wait.
REQUEST_BOUND = 1.0


@pytest.fixture(scope="module")
def project(copier_session: CopierFixture) -> Project:
    project = project_for(copier_session, COMBO)
    project.sync()
    tracing = (project.path / "src" / "my_service" / "tracing.py").read_text()
    assert f"EXPORT_TIMEOUT = {EXPORT_TIMEOUT}" in tracing
    return project


@pytest.fixture(scope="module")
def database(postgres: Postgres, project: Project) -> str:
    url = postgres.create_database("tracing_drill")
    project.tool("alembic", "upgrade", "head", env={"DATABASE_URL": url})
    return url


def service_env(
    database: str, redis: Redis, receiver: OtlpReceiver, **extra: str
) -> dict[str, str | None]:
    return {
        "ENVIRONMENT": "production",
        "SECRET_KEY": secrets.token_urlsafe(48),
        "LOG_FORMAT": None,  # JSON outside development
        "WEB_CONCURRENCY": "2",
        "DATABASE_URL": database,
        "REDIS_URL": redis.url(60),
        "SENTRY_DSN": "",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_SERVICE_NAME": None,  # the project slug by default
        "OTEL_TRACES_SAMPLER": None,  # parent-based, always on for a root
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # ms between exports: spans arrive at once
        **extra,
    }


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with otlp_receiver() as r:
        yield r


@pytest.fixture
def service(
    project: Project, database: str, redis: Redis, receiver: OtlpReceiver, tmp_path: Path
) -> Iterator[Service]:
    with serve(project, service_env(database, redis, receiver), tmp_path) as svc:
        yield svc


def traced_request(svc: Service, method: str, path: str, request_id: str) -> None:
    headers = {"traceparent": TRACEPARENT, "X-Request-ID": request_id}
    response = http_request(svc.port, method, path, headers)
    assert response.status == 200, response


def test_spans_continue_the_callers_trace_and_join_the_logs(
    request: pytest.FixtureRequest, service: Service, receiver: OtlpReceiver
) -> None:
    start = time.monotonic()
    traced_request(service, "GET", "/api/v1/items", "trace-items")
    traced_request(service, "POST", "/api/v1/counters/traced", "trace-counter")

    def server_span(request_id: str) -> dict[str, Any]:
        found = receiver.wait_for_spans(
            lambda s: s["kind"] == SERVER and s["attributes"].get("request_id") == request_id
        )
        assert len(found) == 1, (request_id, receiver.spans, receiver.errors)
        return found[0]

    items, counter = server_span("trace-items"), server_span("trace-counter")
    arrived = time.monotonic() - start
    assert not receiver.errors, receiver.errors
    for span, route in ((items, "/api/v1/items"), (counter, "/api/v1/counters/{name}")):
        assert span["trace_id"] == TRACE_ID
        assert span["parent_span_id"] == PARENT_ID
        assert span["attributes"]["http.route"] == route
        assert span["attributes"]["http.response.status_code"] == 200
        assert span["resource"]["service.name"] == "my-service"
    assert items["name"] == "GET /api/v1/items"
    assert counter["name"] == "POST /api/v1/counters/{name}"

    def children(parent: dict[str, Any]) -> list[dict[str, Any]]:
        return receiver.wait_for_spans(
            lambda s: s["parent_span_id"] == parent["span_id"] and s["kind"] == CLIENT
        )

    sql = [s["name"] for s in children(items)]
    assert any(name.startswith("SELECT") for name in sql), sql
    assert "INCRBY" in [s["name"] for s in children(counter)], receiver.spans  # redis-py's incr

    # Every line of each request (the access line included) carries the span's ids.
    for request_id, span in (("trace-items", items), ("trace-counter", counter)):
        lines = service.wait_for_log(lambda line, rid=request_id: line.get("request_id") == rid)
        assert any(line.get("event") == "request" for line in lines), lines
        for line in lines:
            assert line.get("trace_id") == TRACE_ID, line
            assert line.get("span_id") == span["span_id"], line
    report(
        request,
        "tracing",
        {"spans": len(receiver.spans), "arrived_after_s": round(arrived, 3), "sql": sql},
    )


def test_a_frozen_or_dead_collector_slows_and_fails_no_request(
    request: pytest.FixtureRequest, service: Service, receiver: OtlpReceiver
) -> None:
    def timed(count: int, tag: str) -> list[float]:
        seconds = []
        for i in range(count):
            headers = {"traceparent": TRACEPARENT, "X-Request-ID": f"{tag}-{i}"}
            response = http_request(service.port, "GET", "/api/v1/items", headers)
            assert response.status == 200, response
            assert response.seconds < REQUEST_BOUND, (tag, i, response.seconds)
            seconds.append(response.seconds)
        return seconds

    healthy = timed(20, "healthy")
    receiver.wait_for_spans(lambda s: s["kind"] == SERVER, count=20)
    receiver.frozen.set()
    requests_before = receiver.requests
    # Long enough for several exports to hang on it (each gives up after EXPORT_TIMEOUT).
    frozen = timed(40, "frozen")
    deadline = time.monotonic() + EXPORT_TIMEOUT + 2
    while time.monotonic() < deadline:
        frozen += timed(5, "frozen-more")
    assert receiver.requests > requests_before, "no export reached the frozen collector"
    receiver.stop()  # down: the port closed, kept-alive connections cut
    down = timed(40, "down")
    assert service.get("/health/ready").status == 200
    lines = service.log_lines()
    failed = [line for line in lines if line.get("event") == "request" and line["status"] != 200]
    assert not failed, failed
    report(
        request,
        "tracing-collector-outage",
        {
            phase: {
                "requests": len(values),
                "median_ms": round(statistics.median(values) * 1000, 1),
                "max_ms": round(max(values) * 1000, 1),
            }
            for phase, values in (("healthy", healthy), ("frozen", frozen), ("down", down))
        },
    )


def test_spans_still_queued_are_exported_at_sigterm(
    project: Project, database: str, redis: Redis, receiver: OtlpReceiver, tmp_path: Path
) -> None:
    """A schedule delay of a minute: nothing leaves by the timer during the test, so what
    arrives was exported by the workers' shutdown."""
    env = service_env(database, redis, receiver, OTEL_BSP_SCHEDULE_DELAY="60000")
    with serve(project, env, tmp_path) as svc:
        for i in range(5):
            traced_request(svc, "GET", "/api/v1/info", f"queued-{i}")
        time.sleep(0.5)
        assert not [s for s in receiver.spans if s["kind"] == SERVER], receiver.spans
        svc.process.send_signal(signal.SIGTERM)
        assert svc.process.wait(timeout=40) == 0
    ids = {s["attributes"].get("request_id") for s in receiver.spans if s["kind"] == SERVER}
    assert ids == {f"queued-{i}" for i in range(5)}, receiver.spans
    assert not receiver.errors, receiver.errors
