"""Reliability and security drills on running generated services (marker `drills`).

The all-enabled combination of each deployment is booted under gunicorn with its generated
`gunicorn.conf.py`, against real PostgreSQL and Redis, and put through what production does to a
service: dependency outages (stopped and frozen servers) and their recovery, SIGTERM with slow
requests in flight, a worker killed under load, hostile and malformed input (schemathesis against
the service's own schema, and hand-made requests past every limit), unhandled errors reported to
a Sentry-compatible receiver, and the secure defaults of production. Each drill's figures are
printed as a `DRILL {...}` line in the test output (see drills_support.report).

Tests of one combination share its rendering and virtualenv with the matrix (same xdist group).
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from pytest_copier import CopierFixture

from .drills_support import (
    PostgresInstance,
    RedisInstance,
    SentryReceiver,
    drill_app_dir,
    report,
    sentry_receiver,
)
from .helpers import ALL_ENABLED, ROOT, Combo, free_port
from .project import Project, project_for
from .servers import Postgres, Redis
from .services import (
    Response,
    Service,
    connection_refused,
    http_request,
    raw_request,
    serve,
)

pytestmark = pytest.mark.drills

DRILL_APP = "drill_app:create()"
CHECK_TIMEOUT = 1.0  # HEALTH_CHECK_TIMEOUT as generated (.env.example)
COMMAND_TIMEOUT = 3.0  # DATABASE_COMMAND_TIMEOUT for the drills (10 s generated): shorter drills
GRACEFUL_TIMEOUT = 30  # graceful_timeout in the generated gunicorn.conf.py
REQUEST_ID = re.compile(r"[0-9a-f]{32}")
WORKERS = "2"  # WEB_CONCURRENCY for the drills: two workers on a 2-core machine


@pytest.fixture(
    scope="module",
    params=[
        pytest.param(c, id=c.id, marks=pytest.mark.xdist_group(c.id))
        for c in ALL_ENABLED.values()
        # Kubernetes runs docker's image (the same Dockerfile and gunicorn.conf.py): drilling
        # it again here would prove nothing more (its manifests: tests/deploy/test_kubernetes.py;
        # its pod as the Deployment runs it: tests/deploy/test_kubernetes_pod.py).
        if c.deployment != "kubernetes"
    ],
)
def combo(request: pytest.FixtureRequest) -> Combo:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def project(copier_session: CopierFixture, combo: Combo) -> Project:
    project = project_for(copier_session, combo)
    project.sync()
    # The drills must run the generated configuration as generated: check what they rely on.
    config = (project.path / "gunicorn.conf.py").read_text()
    assert re.search(rf"^graceful_timeout = {GRACEFUL_TIMEOUT}$", config, re.MULTILINE)
    if combo.postgres or combo.redis:  # the setting exists only with a dependency to check
        assert re.search(
            r"^HEALTH_CHECK_TIMEOUT=1\.0$",
            (project.path / ".env.example").read_text(),
            re.MULTILINE,
        )
    return project


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, combo: Combo) -> Path:
    directory = tmp_path_factory.mktemp(f"drills-{combo.deployment}")
    drill_app_dir(directory)
    return directory


@pytest.fixture(scope="module")
def database(postgres: Postgres, combo: Combo, project: Project) -> str:
    url = postgres.create_database(f"drills_{combo.deployment}")
    project.tool("alembic", "upgrade", "head", env={"DATABASE_URL": url})
    return url


def base_env(
    database_url: str, redis_url: str, environment: str = "production", **extra: str | None
) -> dict[str, str | None]:
    return {
        "ENVIRONMENT": environment,
        "SECRET_KEY": secrets.token_urlsafe(48),
        "LOG_FORMAT": None,  # JSON outside development
        "LOG_LEVEL": "info",
        "WEB_CONCURRENCY": WORKERS,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "DATABASE_COMMAND_TIMEOUT": str(COMMAND_TIMEOUT),
        "SENTRY_DSN": "",
        **extra,
    }


def redis_db(combo: Combo, offset: int) -> int:
    return 40 + offset * 2 + list(ALL_ENABLED).index(combo.deployment)


@pytest.fixture(scope="module")
def receiver() -> Iterator[SentryReceiver]:
    with sentry_receiver() as r:
        yield r


@pytest.fixture(scope="module")
def production(
    project: Project,
    workdir: Path,
    database: str,
    redis: Redis,
    combo: Combo,
    receiver: SentryReceiver,
) -> Iterator[Service]:
    """The service as production runs it, reporting to the loopback Sentry receiver."""
    env = base_env(
        database, redis.url(redis_db(combo, 0)), SENTRY_DSN=receiver.dsn, DRILL_DIR=str(workdir)
    )
    with serve(project, env, workdir, app=DRILL_APP, extra_path=workdir / "drill_app") as svc:
        yield svc


@pytest.fixture(scope="module")
def staging(
    project: Project, workdir: Path, database: str, redis: Redis, combo: Combo
) -> Iterator[Service]:
    """Staging serves the OpenAPI schema (production does not); no Sentry DSN."""
    env = base_env(
        database, redis.url(redis_db(combo, 1)), environment="staging", DRILL_DIR=str(workdir)
    )
    with serve(project, env, workdir, app=DRILL_APP, extra_path=workdir / "drill_app") as svc:
        yield svc


def assert_json_error(response: Response, status: int | set[int]) -> dict[str, Any]:
    statuses = {status} if isinstance(status, int) else status
    assert response.status in statuses, (response.status, response.body[:300])
    assert response.headers.get("content-type", "").startswith("application/json"), response
    assert b"Traceback" not in response.body and b'File "' not in response.body
    assert REQUEST_ID.fullmatch(response.headers.get("x-request-id", "")), response.headers
    body = response.json()
    assert isinstance(body, dict) and "detail" in body, body
    return body


# --------------------------------------------------------------------------- dependency outage


def _ready_until(
    svc: Service, predicate: Callable[[Response], bool], timeout: float, consecutive: int = 4
) -> float:
    """Seconds until `consecutive` readiness answers in a row (so every worker) satisfy
    predicate; each request must itself answer within the check timeout plus a second."""
    start = time.monotonic()
    streak = 0
    while True:
        response = svc.get("/health/ready", timeout=10)
        assert response.seconds <= CHECK_TIMEOUT + 1, response
        streak = streak + 1 if predicate(response) else 0
        if streak == consecutive:
            return time.monotonic() - start
        assert time.monotonic() - start < timeout, f"readiness still {response.status}: {response}"
        time.sleep(0.1)


def _dependent_request(svc: Service, dependency: str) -> Response:
    if dependency == "redis":
        return http_request(svc.port, "POST", "/api/v1/counters/drill", timeout=30)
    return http_request(svc.port, "GET", "/api/v1/items", timeout=30)


def test_dependency_outage_and_recovery(
    request: pytest.FixtureRequest, project: Project, workdir: Path
) -> None:
    """Stop, then freeze (SIGSTOP: accepts nothing, answers nothing), Redis and then PostgreSQL
    under the running service: readiness names the failed check within its timeout plus a
    second, liveness and routes without the dependency still answer, the routes that need it
    fail (JSON 500) within their own timeouts instead of hanging, and after the dependency is
    back readiness returns to 200 in the same worker processes (pools reconnect)."""
    pg, rd = PostgresInstance(), RedisInstance()
    try:
        pg.start()
        rd.start()
        project.tool("alembic", "upgrade", "head", env={"DATABASE_URL": pg.url()})
        env = base_env(pg.url(), rd.url())
        with serve(project, env, workdir) as svc:
            workers = svc.wait_for_workers(int(WORKERS))
            _ready_until(svc, lambda r: r.status == 200, timeout=20)
            figures: dict[str, Any] = {}
            # What a request needing the dependency may take at most: Redis' socket timeout
            # (2 x check timeout); PostgreSQL's statement timeout plus its connect timeout.
            bounds = {
                "redis": 2 * CHECK_TIMEOUT + 1,
                "postgres": COMMAND_TIMEOUT + 5 * CHECK_TIMEOUT + 1,
            }
            for name, server in (("redis", rd), ("postgres", pg)):
                other = "postgres" if name == "redis" else "redis"
                for mode in ("stopped", "frozen"):
                    # Pools are warm: the dependency is in use when it goes away.
                    for _ in range(4):
                        assert _dependent_request(svc, name).status in {200, 201}
                    if mode == "stopped":
                        server.stop()
                    else:
                        server.freeze()
                    first = svc.get("/health/ready", timeout=10)
                    time_to_503 = first.seconds

                    def failed(r: Response, name: str = name, other: str = other) -> bool:
                        body = r.json()
                        return (
                            r.status == 503
                            and body["checks"][name] in {"error", "timeout"}
                            and body["checks"][other] == "ok"
                        )

                    assert failed(first), first
                    assert time_to_503 <= CHECK_TIMEOUT + 1, first
                    _ready_until(svc, failed, timeout=10, consecutive=3)
                    live = svc.get("/health/live", timeout=10)
                    info = svc.get("/api/v1/info", timeout=10)
                    assert live.status == 200 and live.seconds < 1, live
                    assert info.status == 200 and info.seconds < 1, info
                    dependent = [_dependent_request(svc, name) for _ in range(2)]
                    for response in dependent:
                        body = assert_json_error(response, 500)
                        assert body == {
                            "detail": "Internal Server Error",
                            "request_id": response.headers["x-request-id"],
                        }
                        assert response.seconds <= bounds[name], (name, mode, response)

                    if mode == "stopped":
                        server.start()
                    else:
                        server.thaw()
                    time_to_recover = _ready_until(svc, lambda r: r.status == 200, timeout=15)
                    for _ in range(4):
                        assert _dependent_request(svc, name).status in {200, 201}
                    figures[f"{name}_{mode}"] = {
                        "time_to_503_s": round(time_to_503, 3),
                        "dependent_request_max_s": round(max(r.seconds for r in dependent), 3),
                        "time_to_recover_s": round(time_to_recover, 3),
                    }
            # Recovery happened in the same processes: nothing was restarted.
            assert svc.process.poll() is None
            assert svc.worker_pids() == workers
            report(request, "dependency-outage", figures)
    finally:
        pg.close()
        rd.close()


# --------------------------------------------------------------------------- draining


def test_sigterm_drains_in_flight_requests(
    request: pytest.FixtureRequest,
    project: Project,
    workdir: Path,
    database: str,
    redis: Redis,
    combo: Combo,
) -> None:
    """SIGTERM to the master with slow requests in flight: every one completes with 200, the
    workers mark themselves draining at once (readiness 503), the listener closes (new
    connections refused) while those requests still run, and the master exits 0 well within
    the graceful timeout."""
    slow_s, count = 4.0, 6
    markers = workdir / "drain"
    markers.mkdir()
    env = base_env(database, redis.url(redis_db(combo, 2)), DRILL_DIR=str(markers))
    with serve(project, env, workdir, app=DRILL_APP, extra_path=workdir / "drill_app") as svc:
        svc.wait_for_workers(int(WORKERS))
        pool = concurrent.futures.ThreadPoolExecutor(count)
        futures = [
            pool.submit(
                svc.get,
                f"/api/v1/drill/slow?seconds={slow_s}&tag={i}",
                timeout=GRACEFUL_TIMEOUT + 10,
            )
            for i in range(count)
        ]
        deadline = time.monotonic() + 15
        while len(list(markers.glob("started-*"))) < count:
            assert time.monotonic() < deadline, "slow requests did not start"
            time.sleep(0.02)
        sigterm_at = time.time()
        svc.process.send_signal(signal.SIGTERM)

        probes: list[tuple[float, str]] = []
        while time.time() - sigterm_at < 3:
            try:
                status = str(http_request(svc.port, "GET", "/health/ready", timeout=2).status)
            except ConnectionRefusedError:
                status = "refused"
            except OSError as exc:  # accepted, then closed by a worker that began to drain
                status = type(exc).__name__
            probes.append((time.time() - sigterm_at, status))
            if len(probes) > 3 and all(s == "refused" for _, s in probes[-3:]):
                break
            time.sleep(0.02)
        exit_code = svc.process.wait(timeout=GRACEFUL_TIMEOUT + 10)
        drain_s = time.time() - sigterm_at
        results = [future.result() for future in futures]
        pool.shutdown()
    refused = [t for t, s in probes if s == "refused"]
    assert refused, f"the listener never closed: {probes}"
    first_refused = refused[0]
    # Once closed, it stays closed; nothing after the close is answered 200.
    assert all(s == "refused" for t, s in probes if t >= first_refused), probes
    # Closed while the slow requests were still running.
    assert first_refused < slow_s - 1, probes
    for response in results:
        assert response.status == 200, response
        body = response.json()
        assert body["draining_since"] is not None, body
        assert body["draining_since"] - sigterm_at < 2.0, body
        assert body["ready_status"] == 503, body
        assert body["ready_body"]["checks"]["shutdown"] == "draining", body
        assert body["ready_body"]["checks"]["postgres"] == "ok", body
    assert exit_code == 0, svc.log_path.read_text()[-3000:]
    assert drain_s < GRACEFUL_TIMEOUT, drain_s
    assert drain_s < slow_s + 5, drain_s
    log = svc.log_path.read_text()
    assert "WORKER TIMEOUT" not in log and "SIGKILL" not in log
    report(
        request,
        "drain",
        {
            "in_flight": count,
            "completed_200": sum(r.status == 200 for r in results),
            "workers_serving_them": len({r.json()["pid"] for r in results}),
            "draining_flag_after_s": round(
                max(r.json()["draining_since"] for r in results) - sigterm_at, 3
            ),
            "probes_after_sigterm": {
                s: sum(1 for _, x in probes if x == s) for s in sorted({s for _, s in probes})
            },
            "listener_closed_after_s": round(first_refused, 3),
            "drain_time_s": round(drain_s, 3),
            "master_exit_code": exit_code,
        },
    )


# --------------------------------------------------------------------------- worker crash


def _log_time(line: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(line["timestamp"]).replace("Z", "+00:00")).timestamp()


def test_worker_killed_under_load(
    request: pytest.FixtureRequest,
    project: Project,
    workdir: Path,
    database: str,
    redis: Redis,
    combo: Combo,
) -> None:
    """10 s of load at 32 connections from a second process; after 3 s one worker is killed
    with SIGKILL. gunicorn boots a replacement; at least 99.9% of requests succeed."""
    seconds, connections, kill_after = 10, 32, 3.0
    env = base_env(database, redis.url(redis_db(combo, 3)))
    with serve(project, env, workdir) as svc:
        before = svc.wait_for_workers(int(WORKERS))
        load = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "tests" / "drills_load.py"),
                "--port",
                str(svc.port),
                "--path",
                "/api/v1/info",
                "--seconds",
                str(seconds),
                "--connections",
                str(connections),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            time.sleep(kill_after)
            startups = svc.startups()
            killed_at = time.time()
            victim = svc.kill_serving_worker()
            out, err = load.communicate(timeout=seconds + 30)
        finally:
            if load.poll() is None:
                load.kill()
                load.wait()
        assert load.returncode == 0, err
        stats = json.loads(out)
        after = svc.wait_for_workers(int(WORKERS), startups=startups + 1, timeout=30)
        assert victim not in after and after - before, (before, after)
        log = svc.log_lines()
        # max_requests (10000 + jitter) may also recycle the surviving worker under this load:
        # gracefully, but its keep-alive connections close, which the load generator counts.
        recycled = sum(1 for line in log if "Maximum request limit" in str(line.get("event")))
        booted = [
            int(str(line["event"]).rsplit(" ", 1)[1])
            for line in log
            if str(line.get("event")).startswith("Booting worker with pid:")
            and _log_time(line) >= killed_at - 0.5
        ]
        assert booted, "no worker booted after the kill"
        started = [
            line for line in log if line.get("event") == f"Started server process [{booted[0]}]"
        ]
        assert started, "no start line for the replacement worker"
        replaced_after = _log_time(started[0]) - killed_at
        assert svc.get("/health/ready").status == 200
    lost = sum(stats["lost_in_flight"].values())
    report(
        request,
        "worker-crash",
        {
            "workers": int(WORKERS),
            "connections": connections,
            "seconds": stats["seconds"],
            "sent": stats["sent"],
            "ok": stats["ok"],
            "failed": stats["failed"],
            "failure_reasons": stats["reasons"],
            "lost_in_flight_then_retried": stats["lost_in_flight"],
            "retried_ok": stats["retried_ok"],
            "success_ratio": round(stats["success_ratio"], 5),
            "requests_per_second": stats["requests_per_second"],
            "replacement_started_after_s": round(replaced_after, 3),
            "workers_recycled_by_max_requests": recycled,
        },
    )
    assert stats["sent"] > 0
    assert stats["success_ratio"] >= 0.999, stats
    # Only requests in flight on the killed worker's connections were lost (each connection has
    # at most one), and on those of a worker recycled by max_requests: anything more would be
    # the surviving worker failing.
    assert lost <= connections * (1 + recycled), stats


# --------------------------------------------------------------------------- hostile input


def test_schemathesis_finds_no_server_error(
    request: pytest.FixtureRequest, staging: Service, tmp_path: Path
) -> None:
    """schemathesis against the service's own /openapi.json: every check (5xx, status codes,
    content types, response schemas, stateful links), examples and fuzzing bounded in number."""
    schemathesis = Path(sys.executable).parent / "schemathesis"
    assert schemathesis.exists(), "schemathesis missing: it is a dev dependency (uv sync)"
    proc = subprocess.run(
        [
            str(schemathesis),
            "run",
            f"{staging.base_url}/openapi.json",
            "--checks",
            "all",
            # Starlette answers 405 with the Allow of the first route matching the path (a path
            # with GET and POST routes says `Allow: POST` to OPTIONS): framework routing, not
            # this service's code; every other check runs.
            "--exclude-checks",
            "allow_header_conformance",
            # The drill's own routes (a deliberate 500, a deliberate sleep) are not the service's.
            "--exclude-path-regex",
            "^/api/v1/drill/",
            "--max-examples",
            "25",
            "--request-timeout",
            "10",
            # One worker: with two threads, Python 3.11's ast.parse (hypothesis describing its
            # lambdas) can fail with "AST constructor recursion depth mismatch" (CPython
            # gh-106905), a crash of the tool, not a finding; seen once in CI.
            "--workers",
            "1",
            "--report",
            "junit",
            "--report-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-8000:]
    generated = re.search(r"(\d+) generated", output)
    report(
        request,
        "schemathesis",
        {
            "test_cases": int(generated.group(1)) if generated else None,
            "operations": re.search(r"Tested: (\d+)", output).group(1)  # type: ignore[union-attr]
            if re.search(r"Tested: (\d+)", output)
            else None,
            "seed": (re.search(r"Seed: (\d+)", output) or [None, None])[1],
        },
    )
    # No 5xx in the service's own log either (a worker error the client might not see).
    errors = [line for line in staging.log_lines() if line.get("level") in {"error", "critical"}]
    assert not errors, errors[:3]


def _hostile_cases() -> list[tuple[str, bytes, int]]:
    def req(
        method: str,
        target: str,
        fields: dict[str, str] | None = None,
        body: bytes = b"",
        chunked: bool = False,
    ) -> bytes:
        lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
        lines += [f"{k}: {v}" for k, v in (fields or {}).items()]
        if chunked:
            lines.append("Transfer-Encoding: chunked")
            payload = b"".join(
                b"%x\r\n%s\r\n" % (len(c), c)
                for c in (body[i : i + 65536] for i in range(0, len(body), 65536))
            )
            body = payload + b"0\r\n\r\n"
        elif body or method == "POST":
            lines.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body

    json_type = {"Content-Type": "application/json"}
    big = json.dumps({"name": "x" * (2 * 1024 * 1024)}).encode()
    return [
        ("malformed JSON", req("POST", "/api/v1/items", json_type, b'{"name": "x",'), 422),
        ("not UTF-8", req("POST", "/api/v1/items", json_type, b'{"name": "\xff\xfe"}'), 400),
        ("wrong type in body", req("POST", "/api/v1/items", json_type, b'{"name": 5}'), 422),
        ("wrong type in path", req("GET", "/api/v1/items/abc"), 422),
        ("out-of-range id", req("GET", "/api/v1/items/99999999999999999999"), 422),
        ("out-of-range offset", req("GET", "/api/v1/items?offset=99999999999999999999"), 422),
        ("bad counter name", req("POST", "/api/v1/counters/NOT-ALLOWED!"), 422),
        ("oversized body (Content-Length)", req("POST", "/api/v1/items", json_type, big), 413),
        ("oversized body (chunked)", req("POST", "/api/v1/items", json_type, big, True), 413),
        ("over-long header field", req("GET", "/api/v1/info", {"X-Big": "a" * 16000}), 431),
        (
            "too many header fields",
            req("GET", "/api/v1/info", {f"X-F{i}": "1" for i in range(150)}),
            431,
        ),
        ("over-long request line", req("GET", "/api/v1/info?q=" + "a" * 10000), 414),
        # Before the fix, one such header (100 MB) held a worker until gunicorn killed it.
        (
            "32 MB header",
            b"GET /api/v1/info HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Huge: "
            + b"a" * 32_000_000
            + b"\r\n\r\n",
            431,
        ),
    ]


def test_hostile_and_malformed_input(request: pytest.FixtureRequest, production: Service) -> None:
    """Each hostile request gets its 4xx with a JSON body and a request id, never a 500 or a
    traceback, in well under a second, and the log line written for it carries that id."""
    # Every worker up first: the service answers once one is, and a later fork is not a loss.
    workers = production.wait_for_workers(int(WORKERS))
    figures: dict[str, Any] = {}
    for name, data, status in _hostile_cases():
        response = raw_request(production.port, data, timeout=30)
        body = assert_json_error(response, status)
        request_id = response.headers["x-request-id"]
        assert response.seconds < 5, (name, response.seconds)
        lines = production.wait_for_log(lambda line, rid=request_id: line.get("request_id") == rid)
        assert lines, f"{name}: no log line with request id {request_id}"
        assert any(line.get("status") == status for line in lines), (name, lines)
        assert not [line for line in lines if line.get("level") in {"error", "critical"}], lines
        if "request_id" in body:
            assert body["request_id"] == request_id
        figures[name] = {"status": response.status, "seconds": round(response.seconds, 3)}
    # A malformed X-Request-ID is not refused: it is replaced by a fresh id, which the
    # response and the access line carry (issue 2: a well-formed one is kept).
    for bad in ["has space", "x" * 200, "../../etc/passwd;<script>", "caf\xe9", '{"a": 1}']:
        response = http_request(production.port, "GET", "/api/v1/info", {"X-Request-ID": bad})
        assert response.status == 200, response
        request_id = response.headers["x-request-id"]
        assert REQUEST_ID.fullmatch(request_id) and request_id != bad
        access = production.wait_for_log(
            lambda line, rid=request_id: (
                line.get("request_id") == rid and line.get("event") == "request"
            )
        )
        assert len(access) == 1 and access[0]["status"] == 200, access
    figures["invalid X-Request-ID"] = {"status": 200, "replaced": 5}
    # The service is whole: no worker was lost to any of it.
    assert production.worker_pids() == workers
    assert production.get("/health/ready").status == 200
    report(request, "hostile-input", figures)


# --------------------------------------------------------------------------- preloaded workers


def test_workers_are_forks_of_the_loaded_application(
    production: Service, receiver: SentryReceiver, workdir: Path
) -> None:
    """preload_app: the application is imported once, by the master, and each worker is a fork
    of it, with what uvicorn and the database's dialect would import as a worker starts; yet
    every worker makes its own connections and Sentry client after the fork: its own PostgreSQL
    backends and Redis clients, none another worker uses, and its own transport thread, which
    delivers the worker's event."""
    master = production.process.pid
    workers = production.wait_for_workers(int(WORKERS))
    seen: dict[int, list[dict[str, Any]]] = {}
    deadline = time.monotonic() + 60
    while set(seen) != workers and time.monotonic() < deadline:  # until every worker answered
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            for response in pool.map(lambda _: production.get("/api/v1/drill/whoami"), range(8)):
                assert response.status == 200, response.body
                body = response.json()
                seen.setdefault(body["pid"], []).append(body)
    assert set(seen) == workers, (seen, workers)

    importers = [
        tuple(map(int, line.split())) for line in (workdir / "imported-by").read_text().splitlines()
    ]
    assert [pid for pid, parent in importers if master in (pid, parent)] == [master]

    # What uvicorn imports as a worker starts (its event loop, protocols, lifespan) and the
    # database's dialect and driver were imported by the master: a worker serves without them.
    preloaded = ("uvloop", "uvicorn.", "websockets", "sqlalchemy.dialects", "asyncpg")
    imported = {
        name for bodies in seen.values() for body in bodies for name in body["imported_after_fork"]
    }
    assert not {name for name in imported if name.startswith(preloaded)}, sorted(imported)

    for key in ("postgres_backend", "redis_client"):
        used = {pid: {body[key] for body in bodies} for pid, bodies in seen.items()}
        assert all(used.values()), (key, used)
        for one, other in itertools.combinations(used.values(), 2):
            assert not one & other, (key, used)
    for pid in workers:
        event = receiver.wait_for_event(lambda e, pid=pid: e.get("message") == f"whoami {pid}")
        assert event is not None, f"no event from worker {pid}: {receiver.events}"
    assert not receiver.errors, receiver.errors


# --------------------------------------------------------------------------- unhandled errors


def test_unhandled_error_is_reported_to_sentry(
    request: pytest.FixtureRequest, production: Service, receiver: SentryReceiver
) -> None:
    """An exception in a route: a JSON 500 with the request id and nothing of the internals;
    the traceback in the log with the same id; the event at the Sentry endpoint, tagged."""
    start = time.monotonic()
    response = production.get("/api/v1/drill/boom")
    request_id = response.headers["x-request-id"]
    body = assert_json_error(response, 500)
    assert body == {"detail": "Internal Server Error", "request_id": request_id}
    for secret in (b"RuntimeError", b"internal detail", b"drill_app", b"Traceback"):
        assert secret not in response.body
    lines = production.wait_for_log(
        lambda line: line.get("request_id") == request_id and "exception" in line
    )
    assert lines and "internal detail" in lines[0]["exception"], lines

    def tagged(event: dict[str, Any]) -> bool:
        tags = event.get("tags") or {}
        if isinstance(tags, list):
            tags = dict(tags)
        return bool(tags.get("request_id") == request_id)

    event = receiver.wait_for_event(tagged, timeout=20)
    assert not receiver.errors, receiver.errors
    assert event is not None, f"no Sentry event tagged {request_id}: {receiver.events}"
    values = event["exception"]["values"]
    assert any("internal detail" in str(value.get("value")) for value in values), values
    assert event.get("environment") == "production"
    report(
        request,
        "sentry",
        {
            "event_arrived_after_s": round(time.monotonic() - start, 3),
            "envelopes": receiver.envelopes,
        },
    )


def test_nothing_reaches_sentry_without_a_dsn(
    request: pytest.FixtureRequest,
    project: Project,
    workdir: Path,
    database: str,
    redis: Redis,
    combo: Combo,
) -> None:
    """The same error with SENTRY_DSN empty: nothing is sent, not even at shutdown (when
    sentry-sdk would flush). A receiver listens, as for the production service."""
    with sentry_receiver() as quiet:
        env = base_env(
            database, redis.url(redis_db(combo, 4)), SENTRY_DSN="", DRILL_DIR=str(workdir)
        )
        with serve(project, env, workdir, app=DRILL_APP, extra_path=workdir / "drill_app") as svc:
            response = svc.get("/api/v1/drill/boom")
            assert response.status == 500
            svc.process.send_signal(signal.SIGTERM)
            assert svc.process.wait(timeout=GRACEFUL_TIMEOUT + 10) == 0
        time.sleep(1)
        assert quiet.envelopes == 0 and not quiet.events


# --------------------------------------------------------------------------- secure defaults


@pytest.mark.parametrize(
    "secret_key",
    [None, "change-me-" + "x" * 40, "short-but-real"],
    ids=["missing", "placeholder", "too-short"],
)
def test_production_refuses_to_start_without_a_real_secret_key(
    project: Project, tmp_path: Path, secret_key: str | None
) -> None:
    """No .env in the working directory, so SECRET_KEY comes from the environment alone."""
    port = free_port()
    env = base_env("postgresql://u@127.0.0.1:1/db", "redis://127.0.0.1:1/0", SECRET_KEY=secret_key)
    full_env = {**os.environ, "GUNICORN_CMD_ARGS": f"--bind 127.0.0.1:{port}"}
    for key, value in env.items():
        if value is None:
            full_env.pop(key, None)
        else:
            full_env[key] = value
    proc = subprocess.run(
        [str(project.bin / "gunicorn"), "-c", str(project.path / "gunicorn.conf.py")],
        cwd=tmp_path,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert "SECRET_KEY" in output, output
    assert "Traceback" not in output and "Booting worker" not in output, output
    assert connection_refused(port)


def test_docs_only_outside_production(production: Service, staging: Service) -> None:
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert production.get(path).status == 404, path
        assert staging.get(path).status == 200, path


def test_cors_and_allowed_hosts(production: Service) -> None:
    allowed, evil = "https://api.example.com", "https://evil.example.net"
    preflight = {"Access-Control-Request-Method": "POST"}
    ok = production.get("/api/v1/info", headers={"Origin": allowed})
    assert ok.headers.get("access-control-allow-origin") == allowed
    refused = http_request(
        production.port, "OPTIONS", "/api/v1/items", {"Origin": evil, **preflight}
    )
    assert refused.status == 400 and "access-control-allow-origin" not in refused.headers
    accepted = http_request(
        production.port, "OPTIONS", "/api/v1/items", {"Origin": allowed, **preflight}
    )
    assert accepted.status == 200
    assert accepted.headers.get("access-control-allow-origin") == allowed
    simple = production.get("/api/v1/info", headers={"Origin": evil})
    assert simple.status == 200 and "access-control-allow-origin" not in simple.headers

    assert production.get("/api/v1/info", host="api.example.com").status == 200
    bad_host = production.get("/api/v1/info", host="evil.example.net")
    assert bad_host.status == 400
    request_id = bad_host.headers["x-request-id"]
    access = production.wait_for_log(lambda line: line.get("request_id") == request_id)
    assert access and access[0]["status"] == 400


def test_runs_as_non_root_in_its_deployment_artifact(combo: Combo, project: Project) -> None:
    config = (project.path / "gunicorn.conf.py").read_text()
    assert not re.search(r"^(user|group)\s*=", config, re.MULTILINE)
    if combo.deployment == "docker":
        dockerfile = (project.path / "Dockerfile").read_text()
        runtime = dockerfile.rsplit("\nFROM ", 1)[1]
        users = re.findall(r"^USER\s+(\S+)", runtime, re.MULTILINE)
        assert users, "the runtime stage sets no USER: the container would run as root"
        user = users[-1].split(":")[0]
        assert user not in {"root", "0"}, user
        compose = (project.path / "compose.yaml").read_text()
        assert not re.search(r"^\s*user:\s*[\"']?(root|0)\b", compose, re.MULTILINE)
    else:
        unit = next((project.path / "deploy" / "systemd").glob("*.service")).read_text()
        users = re.findall(r"^User=(\S+)$", unit, re.MULTILINE)
        assert users and users[-1] not in {"root", "0"}, users
        assert "AmbientCapabilities=\n" in unit or "AmbientCapabilities=" not in unit
