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
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

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
    dockerfile_env,
    dockerfile_instructions,
    healthcheck_command,
    nginx_sandbox,
    parse_env_file,
    parse_unit,
    run_healthcheck,
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


def connects(address: tuple[str, int] | str) -> bool:
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family) as s:
        s.settimeout(1)
        try:
            s.connect(address)
        except OSError:
            return False
        return True


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


@pytest.mark.boot
@pytest.mark.xdist_group("deploy-live-docker")
def test_nginx_in_front_of_the_container(
    generated: Callable[[Combo], Generated],
    certificates: Callable[[str], Path],
    postgres: Postgres,
    redis: Redis,
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
    }

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


@pytest.mark.boot
@pytest.mark.xdist_group("deploy-live-systemd")
def test_nginx_in_front_of_the_unit(
    generated: Callable[[Combo], Generated],
    certificates: Callable[[str], Path],
    postgres: Postgres,
    redis: Redis,
    tmp_path: Path,
) -> None:
    """The service started as the unit starts it (ExecStart, WorkingDirectory, EnvironmentFile,
    RuntimeDirectory; paths rewritten): it reports READY=1 on NOTIFY_SOCKET once it listens,
    serves through nginx, reloads on ExecReload's HUP without failing a request, and stops
    within TimeoutStopSec, removing its socket."""
    combo = ALL_ENABLED["systemd"]
    project = generated(combo).copy(tmp_path / "project")
    certificate = certificates(project.domain)
    bin_dir = uv_sync(project)
    unit = parse_unit(project.unit.read_text())
    value = lambda key: unit_value(unit, "Service", key)  # noqa: E731
    slug = project.slug

    with contextlib.ExitStack() as stack:
        # Short paths: unix socket paths are limited to 107 bytes.
        run_dir = Path(tempfile.mkdtemp(prefix="deploy-run-"))
        stack.callback(shutil.rmtree, run_dir, ignore_errors=True)
        runtime = run_dir / value("RuntimeDirectory")
        runtime.mkdir(mode=int(value("RuntimeDirectoryMode"), 8))
        notify_path = str(run_dir / "notify")
        notify = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM))
        notify.bind(notify_path)
        notify.settimeout(60)

        workdir = value("WorkingDirectory")
        exec_start = [
            arg.replace(workdir, str(project.path)).replace(f"/run/{slug}", str(runtime))
            for arg in shlex.split(value("ExecStart"))
        ]
        assert exec_start[0] == str(bin_dir / "gunicorn")
        socket_path = exec_start[exec_start.index("--bind") + 1].removeprefix("unix:")
        # EnvironmentFile=: the .env installed as the guide says (set to production).
        env = {
            "PATH": os.environ["PATH"],
            **deployed_env(project, postgres, redis, "deploy_systemd"),
        }
        if combo.postgres:  # the guide's migration step, as the service user would run it
            run([str(bin_dir / "alembic"), "upgrade", "head"], cwd=project.path, env=env)
        env["NOTIFY_SOCKET"] = notify_path

        app_log = tmp_path / "app.log"
        with started(exec_start, project.path, env, app_log) as process:
            service = Service(process, app_log)
            message = notify.recv(4096).decode()
            assert "READY=1" in message.split("\n"), message
            assert connects(socket_path), "READY=1 before gunicorn listens"
            assert runtime.stat().st_mode & 0o777 == 0o750

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
                    # Known race, seen under CPU load: a stopping worker closes, unread, a
                    # connection nginx has just sent a request on. The site lists its upstream
                    # twice so that nginx retries on a new connection; should the retry meet
                    # the race too, nginx answers 502. At most one request of the reload may;
                    # anything more is a reload that is not graceful.
                    failed = [status for status in statuses if status != 200]
                    sys.stderr.write(f"HUP reload: {len(statuses)} requests, failed {failed}\n")
                    assert len(failed) <= 1 and set(failed) <= {502}, (
                        statuses,
                        sandbox.error_log.read_text()[-3000:],
                    )
                    for _ in range(20):
                        answer = client.get(
                            "/health/live",
                            headers={"Host": project.domain},
                            extensions={"sni_hostname": project.domain},
                        )
                        assert answer.status_code == 200
                        time.sleep(0.05)

            # KillMode=mixed: SIGTERM to the main process, which must be gone in time.
            started_at = time.monotonic()
            service.process.send_signal(signal.SIGTERM)
            service.process.wait(timeout=int(value("TimeoutStopSec")))
            assert time.monotonic() - started_at < int(value("TimeoutStopSec"))
            assert service.process.returncode == 0, service.log.read_text()[-3000:]
            assert not os.path.exists(socket_path)
