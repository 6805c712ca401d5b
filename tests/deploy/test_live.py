"""Live (marked `boot` too): nginx started on loopback ports with the generated site (paths and
ports rewritten, nothing else) in front of the generated service, booted as the
Dockerfile/compose.yaml or the systemd unit would boot it."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from ..drills_support import OtlpReceiver, otlp_receiver, report
from ..helpers import (
    ALL_ENABLED,
    Combo,
    free_port,
    json_lines,
    python_for,
    run,
    started,
    wait_for,
)
from ..servers import Postgres, Redis
from ..services import children_of
from .support import (
    Generated,
    NginxSandbox,
    connects,
    dockerfile_env,
    dockerfile_instructions,
    healthcheck_command,
    nginx_sandbox,
    parse_env_file,
    parse_unit,
    run_healthcheck,
    unit_environment,
    unit_value,
    uv,
)

pytestmark = pytest.mark.deploy


def uv_sync(project: Generated) -> Path:
    """`uv sync --locked --no-dev --compile-bytecode`, as the Dockerfile and the guide run it,
    after the `uv lock` the user runs once; returns the virtualenv's bin directory."""
    python = str(python_for(project.combo.python_version))
    env = {**os.environ, "UV_PYTHON_DOWNLOADS": "never"}
    if not (project.path / "uv.lock").exists():
        run([uv(), "lock", "--python", python], cwd=project.path, env=env)
    run(
        [uv(), "sync", "--locked", "--no-dev", "--compile-bytecode", "--python", python],
        cwd=project.path,
        env=env,
    )
    return project.path / ".venv" / "bin"


@dataclass
class Service:
    process: subprocess.Popen[bytes]
    log: Path

    def lines(self) -> list[dict[str, Any]]:
        out = []
        for raw in json_lines(self.log):
            with contextlib.suppress(ValueError):
                out.append(json.loads(raw))
        return out

    def access_line(self, request_id: str) -> dict[str, Any]:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            found = [x for x in self.lines() if x.get("request_id") == request_id and "status" in x]
            if found:
                assert len(found) == 1, found
                return found[0]
            time.sleep(0.05)
        raise AssertionError(f"no access line for {request_id}:\n{self.log.read_text()[-3000:]}")


def socket_activated(cmd: list[str], listener: socket.socket) -> list[str]:
    """cmd as systemd starts a socket-activated service: the listening socket as file
    descriptor 3, LISTEN_FDS=1 and LISTEN_PID set to the service's own pid (gunicorn checks
    it), through a Python shim that execs cmd in its own process."""
    shim = (
        "import os, sys; fd = int(sys.argv[1]); os.dup2(fd, 3); fd != 3 and os.close(fd); "
        "os.environ.update(LISTEN_FDS='1', LISTEN_PID=str(os.getpid())); "
        "os.execv(sys.argv[2], sys.argv[2:])"
    )
    return [sys.executable, "-c", shim, str(listener.fileno()), *cmd]


@dataclass
class Load:
    """Steady requests through nginx from threads of their own until stopped: /health/live as
    fast as a keep-alive client goes (not rate-limited), and /api/v1/info at 8 a second from
    another address (under the site's 10 per second), recording each version it answers."""

    project: Generated
    sandbox: NginxSandbox
    certificate: Path
    failures: list[str]
    versions: list[str]
    sent: int = 0

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(f"127.0.0.{10 + i}", "/health/live", 0.0))
            for i in range(4)
        ]
        self._threads.append(
            threading.Thread(target=self._run, args=("127.0.0.20", "/api/v1/info", 0.125))
        )

    def _run(self, source: str, path: str, pause: float) -> None:
        headers = {"Host": self.project.domain}
        with https_client(self.sandbox, self.certificate, source) as client:
            while not self._stop.is_set():
                try:
                    answer = client.get(
                        path, headers=headers, extensions={"sni_hostname": self.project.domain}
                    )
                    failure = None if answer.status_code == 200 else str(answer.status_code)
                except httpx.HTTPError as exc:
                    failure, answer = repr(exc), None
                with self._lock:
                    self.sent += 1
                    if failure:
                        self.failures.append(f"{path}: {failure}")
                    elif path == "/api/v1/info" and answer is not None:
                        self.versions.append(answer.json()["version"])
                time.sleep(pause)

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)


@contextlib.contextmanager
def running_nginx(sandbox: NginxSandbox) -> Iterator[subprocess.Popen[bytes]]:
    def listening() -> bool:
        return all(connects(("127.0.0.1", p)) for p in (sandbox.http_port, sandbox.https_port))

    cmd = sandbox.command("-g", "daemon off;")
    log = sandbox.root / "logs" / "stderr.log"
    with started(cmd, sandbox.root, os.environ, log, listening, timeout=20, stop_timeout=15) as p:
        yield p


def deployed_env(
    project: Generated, postgres: Postgres, redis: Redis, database: str
) -> dict[str, str]:
    """.env as the task generated it, set up as deploy/README.md says (ENVIRONMENT=production),
    with the database and Redis of this test run in place of the deployment's hosts."""
    env = parse_env_file(project.read(".env"))
    env["ENVIRONMENT"] = "production"
    if project.combo.postgres:
        env["DATABASE_URL"] = postgres.create_database(database).replace(
            "postgresql://", "postgresql+asyncpg://"
        )
    if project.combo.redis:
        env["REDIS_URL"] = redis.url(int(uuid.uuid4().int % 60) + 1)
    return env


def https_client(sandbox: NginxSandbox, certificate: Path, source: str) -> httpx.Client:
    """A client of the TLS port that trusts only the throwaway certificate, connecting from the
    loopback address `source` (nginx sees it as the client's address)."""
    context = ssl.create_default_context(cafile=str(certificate / "fullchain.pem"))
    transport = httpx.HTTPTransport(verify=context, local_address=source)
    return httpx.Client(
        base_url=f"https://127.0.0.1:{sandbox.https_port}", transport=transport, timeout=10
    )


def assert_through_nginx(
    project: Generated, sandbox: NginxSandbox, certificate: Path, service: Service
) -> None:
    domain = project.domain
    host = {"Host": domain}
    sni = {"sni_hostname": domain}

    # Port 80: everything is redirected to HTTPS, except Let's Encrypt's challenges.
    with httpx.Client(base_url=f"http://127.0.0.1:{sandbox.http_port}", timeout=10) as plain:
        answer = plain.get("/api/v1/info?x=1", headers=host)
        assert answer.status_code == 301
        assert answer.headers["location"] == f"https://{domain}/api/v1/info?x=1"
        token = sandbox.acme / ".well-known" / "acme-challenge" / "token-123"
        token.parent.mkdir(parents=True, exist_ok=True)
        token.write_text("challenge-answer")
        answer = plain.get("/.well-known/acme-challenge/token-123", headers=host)
        assert (answer.status_code, answer.text) == (200, "challenge-answer")

    with https_client(sandbox, certificate, "127.0.0.2") as client:
        # A 200 through TLS, with the security headers, each sent once.
        request_id = f"deploy-{uuid.uuid4().hex}"
        answer = client.get(
            "/api/v1/info",
            headers={**host, "X-Request-ID": request_id, "X-Forwarded-For": "203.0.113.9"},
            extensions=sni,
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["environment"] == "production"
        assert answer.headers["strict-transport-security"] == "max-age=63072000; includeSubDomains"
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["x-frame-options"] == "DENY"
        assert answer.headers["referrer-policy"] == "strict-origin-when-cross-origin"
        assert answer.headers["server"] == "nginx", "server_tokens off"
        # The request id passes through both ways; the app sees the client's own address, not
        # nginx's and not the address the client claimed in X-Forwarded-For.
        assert answer.headers["x-request-id"] == request_id
        line = service.access_line(request_id)
        assert (line["client"], line["path"], line["status"]) == ("127.0.0.2", "/api/v1/info", 200)

        # Without an id, nginx makes one; the app and nginx's access log both carry it.
        answer = client.get("/api/v1/info", headers=host, extensions=sni)
        generated_id = answer.headers["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{32}", generated_id)
        service.access_line(generated_id)
        # nginx writes its access line after the response has gone out: wait for it.
        deadline = time.monotonic() + 5
        while f"request_id={generated_id}" not in sandbox.access_log.read_text():
            assert time.monotonic() < deadline, sandbox.access_log.read_text()[-3000:]
            time.sleep(0.05)

        # Issue 16: a malformed id (here, text that would forge a field in nginx's log) is
        # replaced by nginx with its own, which the app keeps: both logs carry the same id.
        malformed = 'forged" request_id=evil x="'
        answer = client.get(
            "/api/v1/info", headers={**host, "X-Request-ID": malformed}, extensions=sni
        )
        replaced = answer.headers["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{32}", replaced), replaced
        service.access_line(replaced)
        deadline = time.monotonic() + 5
        while f"request_id={replaced}\n" not in sandbox.access_log.read_text():
            assert time.monotonic() < deadline, sandbox.access_log.read_text()[-3000:]
            time.sleep(0.05)
        assert "forged" not in sandbox.access_log.read_text()
        # The metrics are served on the master's own port (METRICS_BIND), which nginx never
        # proxies: /metrics through nginx is the app's 404, not the metrics.
        answer = client.get("/metrics", headers=host, extensions=sni)
        assert answer.status_code == 404 and "http_requests_total" not in answer.text

        # Dotfiles never reach the app.
        assert client.get("/.env", headers=host, extensions=sni).status_code == 404
        assert not [x for x in service.lines() if x.get("path") == "/.env"]

        # Health checks: not rate limited, not in nginx's access log.
        for _ in range(40):
            assert client.get("/health/live", headers=host, extensions=sni).status_code == 200
        assert "/health/" not in sandbox.access_log.read_text()

    # TLS 1.2 and 1.3 are both offered.
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        context = ssl.create_default_context(cafile=str(certificate / "fullchain.pem"))
        context.minimum_version = context.maximum_version = version
        with (
            socket.create_connection(("127.0.0.1", sandbox.https_port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname=domain) as tls,
        ):
            assert tls.version() == version.name.replace("v1_", "v1.")

    # From a fresh address: the burst passes, then 429, with the security headers still on.
    with https_client(sandbox, certificate, "127.0.0.3") as client:
        statuses = []
        for _ in range(40):
            answer = client.get("/api/v1/info", headers=host, extensions=sni)
            statuses.append(answer.status_code)
            if answer.status_code == 429:
                assert answer.headers["strict-transport-security"]
                break
        assert statuses[:20] == [200] * 20 and statuses[-1] == 429, statuses


def psql_value(postgres: Postgres, database: str, sql: str) -> str:
    proc = run(
        [
            str(postgres.bindir / "psql"),
            *("-h", postgres.host, "-p", str(postgres.port), "-U", postgres.user, "-d", database),
            *("-A", "-t", "-c", sql),
        ]
    )
    return proc.stdout.strip()


def assert_slow_get_runs_once(
    project: Generated,
    certificate: Path,
    service: Service,
    postgres: Postgres,
    database: str,
    root: Path,
    upstream: str,
) -> None:
    """A GET slower than nginx's proxy_read_timeout (shortened to 1 s here; a table lock holds
    the query) runs once in the service: nginx answers 504 after one timeout, not two, and
    does not send the request again to the second upstream entry."""
    text = project.nginx_conf.read_text()
    assert "proxy_read_timeout 35s;" in text
    sandbox = nginx_sandbox(
        project,
        text.replace("proxy_read_timeout 35s;", "proxy_read_timeout 1s;"),
        certificate,
        root,
        upstream,
    )
    lock_s = 5
    locker = threading.Thread(
        target=postgres.psql,
        args=(
            f"BEGIN; LOCK TABLE items IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep({lock_s}); COMMIT;",
            database,
        ),
    )
    with running_nginx(sandbox), https_client(sandbox, certificate, "127.0.0.5") as client:
        locker.start()
        try:
            deadline = time.monotonic() + lock_s - 2
            while (
                psql_value(
                    postgres,
                    database,
                    "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
                    "WHERE c.relname = 'items' AND l.mode = 'AccessExclusiveLock' AND l.granted",
                )
                != "1"
            ):
                assert time.monotonic() < deadline, "the table lock was not taken"
                time.sleep(0.05)
            request_id = f"slow-{uuid.uuid4().hex}"
            started_at = time.monotonic()
            answer = client.get(
                "/api/v1/items",
                headers={"Host": project.domain, "X-Request-ID": request_id},
                extensions={"sni_hostname": project.domain},
            )
            waited = time.monotonic() - started_at
        finally:
            locker.join()
        assert answer.status_code == 504, answer.text
        # The query ends once the lock is gone; a second run would end about as soon.
        service.access_line(request_id)
        time.sleep(1)
        runs = [x for x in service.lines() if x.get("request_id") == request_id and "status" in x]
        assert len(runs) == 1, f"the GET ran {len(runs)} times: {runs}"
        assert waited < 1.9, f"504 after {waited:.2f} s: nginx waited for a second attempt"


def with_real_ip(site_text: str, trusted: str) -> str:
    """The site with its commented `real_ip` lines switched on, trusting `trusted`."""
    lines = re.findall(
        r"^# ((?:set_real_ip_from|real_ip_header|real_ip_recursive) .*;)$", site_text, re.M
    )
    assert [line.split()[0] for line in lines] == [
        "set_real_ip_from",
        "real_ip_header",
        "real_ip_recursive",
    ], lines
    for line in lines:
        on = re.sub(r"^set_real_ip_from \S+;", f"set_real_ip_from {trusted};", line)
        site_text = site_text.replace(f"# {line}", on)
    return site_text


def assert_real_ip_from_a_trusted_balancer(
    project: Generated, certificate: Path, service: Service, root: Path, upstream: str
) -> None:
    """Issue 16: the site's commented real_ip lines, switched on as deploy/README.md says, make
    nginx take the client's address from a trusted balancer's X-Forwarded-For: the service and
    nginx's log see the client, not the balancer."""
    guide = project.read("deploy/README.md")
    block = re.search(r"```nginx\n(.*?)```", guide, re.S).group(1)
    documented = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    site_text = project.nginx_conf.read_text()
    assert [f"# {line}" in site_text for line in documented] == [True] * 3, documented
    sandbox = nginx_sandbox(
        project, with_real_ip(site_text, "127.0.0.0/8"), certificate, root, upstream
    )
    with running_nginx(sandbox), https_client(sandbox, certificate, "127.0.0.6") as balancer:
        request_id = f"real-ip-{uuid.uuid4().hex}"
        answer = balancer.get(
            "/api/v1/info",
            headers={
                "Host": project.domain,
                "X-Request-ID": request_id,
                "X-Forwarded-For": "198.51.100.23, 203.0.113.9",
            },
            extensions={"sni_hostname": project.domain},
        )
        assert answer.status_code == 200, answer.text
        assert service.access_line(request_id)["client"] == "203.0.113.9"
        deadline = time.monotonic() + 5
        while f"request_id={request_id}" not in sandbox.access_log.read_text():
            assert time.monotonic() < deadline, sandbox.access_log.read_text()[-3000:]
            time.sleep(0.05)
        (line,) = [x for x in sandbox.access_log.read_text().splitlines() if request_id in x]
        assert line.startswith("203.0.113.9 "), line


@pytest.fixture
def otlp() -> Iterator[OtlpReceiver]:
    """A loopback OTLP endpoint taking the service's spans (tracing on)."""
    with otlp_receiver() as receiver:
        yield receiver


@pytest.mark.boot
@pytest.mark.xdist_group("deploy-live-docker")
def test_nginx_in_front_of_the_container(
    generated: Callable[[Combo], Generated],
    certificates: Callable[[str], Path],
    postgres: Postgres,
    redis: Redis,
    otlp: OtlpReceiver,
    tmp_path: Path,
) -> None:
    """The service booted as the image would boot it (Dockerfile ENV and CMD, compose's env_file
    and environment, migrations first as compose's `migrate` does), the HEALTHCHECK passing on
    it, and nginx with the generated site in front."""
    combo = ALL_ENABLED["docker"]
    project = generated(combo).copy(tmp_path / "project")
    certificate = certificates(project.domain)
    bin_dir = uv_sync(project)
    compose = yaml.safe_load(project.read("compose.yaml"))
    dockerfile = project.read("Dockerfile")

    port = free_port()
    image_env = dockerfile_env(dockerfile)
    image_env.pop("PATH")
    app_env = {k: str(v) for k, v in compose["services"]["app"]["environment"].items()}
    assert app_env["BIND"] == image_env["BIND"] == "0.0.0.0:8000"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        **image_env,
        **deployed_env(project, postgres, redis, "deploy_docker"),
        **app_env,
        "BIND": f"127.0.0.1:{port}",
        "METRICS_BIND": f"127.0.0.1:{free_port()}",
    }
    assert combo.tracing
    env["OTEL_EXPORTER_OTLP_ENDPOINT"] = otlp.endpoint

    migrate = compose["services"]["migrate"]["command"]
    run([str(bin_dir / migrate[0]), *migrate[1:]], cwd=project.path, env=env)

    (cmd,) = [json.loads(a) for i, a in dockerfile_instructions(dockerfile) if i == "CMD"]
    app_log = tmp_path / "app.log"
    with started([str(bin_dir / cmd[0]), *cmd[1:]], project.path, env, app_log) as process:
        service = Service(process, app_log)
        # Docker's view: the HEALTHCHECK passes within its start period.
        healthcheck = healthcheck_command(dockerfile)
        python = python_for(combo.python_version)
        wait_for(
            lambda: run_healthcheck(healthcheck, python, port).returncode == 0,
            "HEALTHCHECK passing",
            service.process,
            service.log,
            timeout=30,
        )
        sandbox = nginx_sandbox(
            project,
            project.nginx_conf.read_text(),
            certificate,
            tmp_path / "nginx",
            f"127.0.0.1:{port}",
        )
        with running_nginx(sandbox):
            assert_through_nginx(project, sandbox, certificate, service)
            assert_trace_context_stops_at_nginx(project, sandbox, certificate, service, port)


def assert_trace_context_stops_at_nginx(
    project: Generated, sandbox: NginxSandbox, certificate: Path, service: Service, port: int
) -> None:
    """Tracing on (an endpoint set): a client's sampled traceparent does not reach the service
    through nginx, which starts a trace of its own; a caller that reaches the service directly
    continues its trace."""
    caller = uuid.uuid4().hex
    headers = {"Host": project.domain, "traceparent": f"00-{caller}-b7ad6b7169203331-01"}
    with https_client(sandbox, certificate, "127.0.0.2") as client:
        request_id = f"traced-{uuid.uuid4().hex}"
        answer = client.get(
            "/api/v1/info",
            headers={**headers, "X-Request-ID": request_id},
            extensions={"sni_hostname": project.domain},
        )
        assert answer.status_code == 200, answer.text
    through_nginx = service.access_line(request_id).get("trace_id")
    assert through_nginx not in (None, caller), through_nginx
    request_id = f"direct-{uuid.uuid4().hex}"
    answer = httpx.get(
        f"http://127.0.0.1:{port}/api/v1/info",
        headers={**headers, "X-Request-ID": request_id},
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    assert service.access_line(request_id)["trace_id"] == caller


@pytest.mark.boot
@pytest.mark.xdist_group("deploy-live-systemd")
def test_nginx_in_front_of_the_unit(
    request: pytest.FixtureRequest,
    generated: Callable[[Combo], Generated],
    certificates: Callable[[str], Path],
    postgres: Postgres,
    redis: Redis,
    tmp_path: Path,
) -> None:
    """The service started as the units start it (the socket unit's socket passed to ExecStart
    as systemd does, WorkingDirectory, EnvironmentFile; paths rewritten): it reports READY=1 on
    NOTIFY_SOCKET, serves through nginx, reloads on ExecReload's HUP without failing a request,
    restarts and is deployed (new code, then a restart) under steady load through nginx without
    failing a request, and stops within TimeoutStopSec, leaving the socket to systemd."""
    combo = ALL_ENABLED["systemd"]
    project = generated(combo).copy(tmp_path / "project")
    certificate = certificates(project.domain)
    bin_dir = uv_sync(project)
    unit = parse_unit(project.unit.read_text())
    value = lambda key: unit_value(unit, "Service", key)  # noqa: E731
    socket_unit = parse_unit(project.socket_unit.read_text())
    socket_value = lambda key: unit_value(socket_unit, "Socket", key)  # noqa: E731

    with contextlib.ExitStack() as stack:
        # Short paths: unix socket paths are limited to 107 bytes.
        run_dir = Path(tempfile.mkdtemp(prefix="deploy-run-"))
        stack.callback(shutil.rmtree, run_dir, ignore_errors=True)
        notify_path = str(run_dir / "notify")
        notify = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM))
        notify.bind(notify_path)
        notify.settimeout(60)
        # The socket unit, played: systemd listens before the service starts, and keeps the
        # socket open across the service's restarts.
        socket_path = str(run_dir / Path(socket_value("ListenStream")).name)
        listener = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        listener.bind(socket_path)
        os.chmod(socket_path, int(socket_value("SocketMode"), 8))
        listener.listen(int(socket_value("Backlog")))

        workdir = value("WorkingDirectory")
        exec_start = [
            arg.replace(workdir, str(project.path)) for arg in shlex.split(value("ExecStart"))
        ]
        assert exec_start[0] == str(bin_dir / "gunicorn")
        # Environment=, then EnvironmentFile= (which wins): the .env installed as the guide
        # says, without an ENVIRONMENT line, so that production comes from the unit.
        env_file = deployed_env(project, postgres, redis, "deploy_systemd")
        del env_file["ENVIRONMENT"]
        env = {"PATH": os.environ["PATH"], **unit_environment(unit), **env_file}
        if combo.postgres:  # the guide's migration step, as the service user would run it
            run([str(bin_dir / "alembic"), "upgrade", "head"], cwd=project.path, env=env)
        env["NOTIFY_SOCKET"] = notify_path
        env["METRICS_BIND"] = f"127.0.0.1:{free_port()}"  # .env's port: taken by a parallel test

        def start(log: Path) -> Service:
            """`systemctl start`: ExecStart with the socket; returns once READY=1 arrives."""
            process = stack.enter_context(
                started(
                    socket_activated(exec_start, listener),
                    project.path,
                    env,
                    log,
                    pass_fds=(listener.fileno(),),
                )
            )
            message = notify.recv(4096).decode()
            assert "READY=1" in message.split("\n"), message
            return Service(process, log)

        def stop(service: Service) -> float:
            """`systemctl stop` (KillMode=mixed: SIGTERM to the main process, which must be
            gone within TimeoutStopSec, exiting 0); returns the seconds it took."""
            started_at = time.monotonic()
            service.process.send_signal(signal.SIGTERM)
            service.process.wait(timeout=int(value("TimeoutStopSec")))
            took = time.monotonic() - started_at
            assert service.process.returncode == 0, service.log.read_text()[-3000:]
            return took

        service = start(tmp_path / "app.log")
        assert connects(socket_path)

        sandbox = nginx_sandbox(
            project,
            project.nginx_conf.read_text(),
            certificate,
            tmp_path / "nginx",
            f"unix:{socket_path}",
        )
        with running_nginx(sandbox):
            assert_through_nginx(project, sandbox, certificate, service)

            # ExecReload: HUP to the main process; requests keep succeeding meanwhile.
            signal_name = shlex.split(value("ExecReload"))[2]
            booted = lambda: service.log.read_text().count("Booting worker")  # noqa: E731
            before, old_workers = booted(), children_of(service.process.pid)
            with https_client(sandbox, certificate, "127.0.0.4") as client:
                os.kill(service.process.pid, getattr(signal, f"SIG{signal_name}"))
                deadline = time.monotonic() + 30
                statuses: list[int] = []
                # Until the new workers have booted and the old ones have exited.
                while (
                    booted() < 2 * before or old_workers & children_of(service.process.pid)
                ) and time.monotonic() < deadline:
                    answer = client.get(
                        "/health/live",
                        headers={"Host": project.domain},
                        extensions={"sni_hostname": project.domain},
                    )
                    statuses.append(answer.status_code)
                    time.sleep(0.05)
                assert booted() == 2 * before, "HUP did not replace the workers"
                assert old_workers, "no workers before the reload"
                assert not old_workers & children_of(service.process.pid), "old workers left"
                # Not one request lost: a stopping worker answers what was sent to it before it
                # closes a connection (protocol.py), and nginx retries an idempotent request on
                # a new connection when a kept-alive one closes under it.
                failed = [status for status in statuses if status != 200]
                sys.stderr.write(f"HUP reload: {len(statuses)} requests, failed {failed}\n")
                assert not failed, (statuses, sandbox.error_log.read_text()[-3000:])
                for _ in range(20):
                    answer = client.get(
                        "/health/live",
                        headers={"Host": project.domain},
                        extensions={"sni_hostname": project.domain},
                    )
                    assert answer.status_code == 200
                    time.sleep(0.05)

            # Issue 16: a restart, then a deploy (new code, then a restart), under steady load
            # through nginx: connections wait in systemd's socket while no gunicorn serves it.
            failures: list[str] = []
            versions: list[str] = []
            figures: dict[str, Any] = {}
            init = project.path / "src" / project.package / "__init__.py"
            with Load(project, sandbox, certificate, failures, versions) as load:
                time.sleep(1)
                for step, log in (("restart", "app-2.log"), ("deploy", "app-3.log")):
                    if step == "deploy":
                        init.write_text(
                            re.sub(r"__version__ = .*", '__version__ = "2.0.0"', init.read_text())
                        )
                    sent_before = load.sent
                    drain = stop(service)
                    gap_started = time.monotonic()
                    service = start(tmp_path / log)
                    figures[step] = {
                        "stop_s": round(drain, 2),
                        "no_gunicorn_s": round(time.monotonic() - gap_started, 2),
                    }
                    # The queued requests are served once a new worker has loaded the app.
                    wait_for(
                        lambda n=sent_before: load.sent > n + 200,
                        step,
                        service.process,
                        service.log,
                    )
                    time.sleep(1)
                    figures[step]["requests"] = load.sent - sent_before
            figures["requests"], figures["failed"] = load.sent, len(failures)
            report(request, "systemd-restart", figures)
            assert not failures, (figures, failures[:10], sandbox.error_log.read_text()[-3000:])
            assert versions[-1] == "2.0.0" and versions[0] != "2.0.0", versions

        assert_real_ip_from_a_trusted_balancer(
            project, certificate, service, tmp_path / "nginx-real-ip", f"unix:{socket_path}"
        )
        assert_slow_get_runs_once(
            project,
            certificate,
            service,
            postgres,
            "deploy_systemd",
            tmp_path / "nginx-slow",
            f"unix:{socket_path}",
        )

        # The service stops in time; the socket is systemd's and stays, queueing connections.
        assert stop(service) < int(value("TimeoutStopSec"))
        assert connects(socket_path)
