"""The compose stack brought up for real (the `containers` tier): the all-features docker project's
compose.yaml and the .env its task made, with the release set in it as the deploy guide sets it
(APP_IMAGE, APP_TAG), on a Docker daemon of the suite's own; the image of that name is the one
podman built from the generated Dockerfile (no registry to pull it from), the other services'
are the stand-ins of tests/containers.

One override file changes what only the host decides: nginx's published ports (free loopback
ports instead of 80/443), where the certificate and the ACME directory come from (a throwaway
certificate instead of /etc/letsencrypt), and, for the drain, one slow route mounted into the app
(the generated application plus that route, started by the image's own gunicorn.conf.py)."""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from ..containers import standins
from ..containers.engines import Docker, Podman
from ..helpers import ALL_ENABLED, Combo, free_port
from .containers import (
    MARKS,
    SLOW_COMMAND,
    build,
    buildable,
    release_image,
    report,
    set_release,
    slow_app_dir,
    wait_until,
)
from .support import Generated

pytestmark = MARKS

NAME = "cf-stack"
# The state each service is meant to reach: the one-shot migrate job exits 0, nginx has no
# health check and runs, every other service is healthy.
INTENDED = {
    "db": "healthy",
    "redis": "healthy",
    "migrate": "exited 0",
    "app": "healthy",
    "nginx": "running",
}


def override(project: Generated, tmp_path: Path, certificate: Path) -> tuple[Path, int]:
    """The host's part of the stack; returns the file and nginx's published HTTPS port."""
    letsencrypt = tmp_path / "letsencrypt"
    live = letsencrypt / "live" / project.domain
    live.mkdir(parents=True)
    for name in ("fullchain.pem", "privkey.pem"):
        shutil.copyfile(certificate / name, live / name)
    acme = tmp_path / "acme"
    acme.mkdir()
    http_port, https_port = free_port(), free_port()
    path = tmp_path / "compose.host.yaml"
    path.write_text(
        f"""\
services:
  nginx:
    ports: !override
      - "127.0.0.1:{http_port}:80"
      - "127.0.0.1:{https_port}:443"
    volumes:
      - {letsencrypt}:/etc/letsencrypt:ro
      - {acme}:/var/www/letsencrypt:ro
  app:
    command: {json.dumps(SLOW_COMMAND)}
    environment:
      PYTHONPATH: /slow
    volumes:
      - {slow_app_dir(project, tmp_path)}:/slow:ro
"""
    )
    return path, https_port


def states(docker: Docker, project: Path, files: list[Path]) -> dict[str, str]:
    """Each service's state as INTENDED spells it."""
    out = docker.compose(project, files, NAME, "ps", "--all", "--format=json").stdout
    rows = [json.loads(line) for line in out.splitlines() if line.strip()]
    if len(rows) == 1 and isinstance(rows[0], list):
        rows = rows[0]
    result = {}
    for row in rows:
        if row["State"] == "exited":
            result[row["Service"]] = f"exited {row['ExitCode']}"
        else:
            result[row["Service"]] = row.get("Health") or row["State"]
    return result


def up(docker: Docker, project: Path, files: list[Path]) -> float:
    """`docker compose up -d`; returns the seconds until every service is in its intended
    state."""
    started = time.monotonic()
    docker.compose(project, files, NAME, "up", "--detach", "--no-build", "--pull=never")
    wait_until(
        lambda: states(docker, project, files) == INTENDED,
        "every service in its intended state",
        180,
        lambda: f"{states(docker, project, files)}\n{compose_logs(docker, project, files)}",
    )
    return time.monotonic() - started


def compose_logs(docker: Docker, project: Path, files: list[Path], *services: str) -> str:
    proc = docker.compose(project, files, NAME, "logs", "--no-color", *services, check=False)
    return (proc.stdout + proc.stderr)[-8000:]


def client(project: Generated, certificate: Path, port: int) -> httpx.Client:
    """HTTPS to nginx's published port, trusting only the throwaway certificate, with the
    domain as SNI and Host."""
    context = ssl.create_default_context(cafile=str(certificate / "fullchain.pem"))
    return httpx.Client(
        base_url=f"https://127.0.0.1:{port}",
        verify=context,
        headers={"Host": project.domain},
        timeout=15,
    )


def call(
    http: httpx.Client, project: Generated, method: str, path: str, **kwargs: Any
) -> httpx.Response:
    request_id = f"stack-{uuid.uuid4().hex}"
    answer = http.request(
        method,
        path,
        headers={"X-Request-ID": request_id},
        extensions={"sni_hostname": project.domain},
        **kwargs,
    )
    assert answer.headers.get("x-request-id") == request_id, (answer.headers, answer.text)
    return answer


# A client of the app on the compose network, in a container of its own (compose stop leaves it
# alone): slow requests straight to app:8000; once all have answered, each status printed as one
# JSON line (threads printing as they finish interleave their lines).
DRAIN_CLIENT = """\
import json, sys, threading, urllib.request
answers = []
def call(i):
    r = urllib.request.Request("http://app:8000/api/v1/test/slow?seconds=%s" % sys.argv[1],
                               headers={"Host": sys.argv[3]})
    try:
        with urllib.request.urlopen(r, timeout=60) as answer:
            answers.append({"status": answer.status})
    except Exception as exc:
        answers.append({"error": repr(exc)})
threads = [threading.Thread(target=call, args=(i,)) for i in range(int(sys.argv[2]))]
[t.start() for t in threads]
[t.join() for t in threads]
print("\\n".join(json.dumps(a) for a in answers), flush=True)
"""


def test_compose_stack(
    request: pytest.FixtureRequest,
    generated: Callable[[Combo], Generated],
    podman: Podman,
    docker: Docker,
    certificates: Callable[[str], Path],
    tmp_path: Path,
) -> None:
    """db, redis, the migrate job, app and nginx reach their intended state; HTTPS through nginx
    reaches routes that use PostgreSQL and Redis, with the request id; `down` then `up` keeps
    the data; `stop` drains the app's in-flight requests and every service exits 0."""
    project = buildable(generated(ALL_ENABLED["docker"]), tmp_path / "project")
    assert (project.path / ".env").exists(), "the copy task makes .env"
    # The release, as a server sets it; the image CI would have pushed is built here instead,
    # under its name, and loaded into Docker (compose never pulls or builds it).
    set_release(project)
    image = release_image(project)
    build(podman, project, image)
    services = yaml.safe_load(project.read("compose.yaml"))["services"]
    assert set(services) == set(INTENDED)
    others = [services[name]["image"] for name in ("db", "redis", "nginx")]
    for name in others:
        standins.ensure(podman, standins.service_standin(name))
    docker.load(podman, image, *(standins.qualified(name) for name in others))

    certificate = certificates(project.domain)
    host_file, https_port = override(project, tmp_path, certificate)
    files = [project.path / "compose.yaml", host_file]
    figures: dict[str, Any] = {}
    try:
        figures["up_to_healthy_s"] = round(up(docker, project.path, files), 1)

        with client(project, certificate, https_port) as http:
            ready = call(http, project, "GET", "/health/ready")
            assert ready.status_code == 200, ready.text
            checks = ready.json()["checks"]
            assert {"postgres", "redis"} <= set(checks), checks
            name = f"item-{uuid.uuid4().hex[:8]}"
            created = call(http, project, "POST", "/api/v1/items", json={"name": name})
            assert created.status_code == 201, created.text
            item = created.json()["id"]
            fetched = call(http, project, "GET", f"/api/v1/items/{item}")
            assert fetched.status_code == 200 and fetched.json()["name"] == name, fetched.text
            counter = call(http, project, "POST", "/api/v1/counters/stack")
            assert counter.status_code == 200 and counter.json()["value"] == 1, counter.text
            request_id = counter.headers["x-request-id"]
        # The app's own access line carries the id nginx passed on.
        assert request_id in compose_logs(docker, project.path, files, "app")

        # down (not -v), then up: the same rows and counter, from the volumes.
        docker.compose(project.path, files, NAME, "down")
        assert not states(docker, project.path, files)
        volumes = docker("volume", "ls", "--format", "{{.Name}}").stdout.split()
        assert {f"{NAME}_postgres-data", f"{NAME}_redis-data"} <= set(volumes), volumes
        figures["up_again_to_healthy_s"] = round(up(docker, project.path, files), 1)
        with client(project, certificate, https_port) as http:
            fetched = call(http, project, "GET", f"/api/v1/items/{item}")
            assert fetched.status_code == 200 and fetched.json()["name"] == name, fetched.text
            counter = call(http, project, "POST", "/api/v1/counters/stack")
            assert counter.status_code == 200 and counter.json()["value"] == 2, counter.text

        figures |= drain(docker, project, files, image)
    finally:
        logs = compose_logs(docker, project.path, files)
        docker.compose(project.path, files, NAME, "down", "--volumes", check=False)
    report(request, "compose", figures)
    assert "Traceback" not in logs, logs


def drain(docker: Docker, project: Generated, files: list[Path], image: str) -> dict[str, Any]:
    slow_s, count = 6.0, 4
    client = subprocess.Popen(
        [
            *docker.command(),
            "run",
            "--rm",
            "--pull=never",
            f"--network={NAME}_default",
            "--entrypoint=python",
            image,
            "-c",
            DRAIN_CLIENT,
            str(slow_s),
            str(count),
            project.domain,
        ],
        env=docker.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    sent = time.monotonic()
    try:
        wait_until(
            lambda: (
                compose_logs(docker, project.path, files, "app").count("slow request started")
                >= count
            ),
            "slow requests in flight",
            20,
            lambda: compose_logs(docker, project.path, files, "app"),
        )
        stopping = time.monotonic()
        docker.compose(project.path, files, NAME, "stop", timeout=120)
        stop_s = time.monotonic() - stopping
        out, err = client.communicate(timeout=60)
    finally:
        if client.poll() is None:
            client.kill()
    answers = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert answers == [{"status": 200}] * count, (out, err)
    exited = states(docker, project.path, files)
    assert exited == dict.fromkeys(INTENDED, "exited 0"), exited
    left = slow_s - (stopping - sent)
    assert stop_s > left - 1, (left, stop_s)
    return {"drain_requests": count, "drain_left_s": round(left, 1), "stop_s": round(stop_s, 1)}
