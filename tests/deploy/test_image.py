"""The generated image, built and run for real (the `containers` tier): for every Python version,
podman builds the generated Dockerfile as it is, from scratch; a change to one source file
rebuilds without touching the dependency layer; Docker runs the image as compose.yaml does and
its HEALTHCHECK, its user, its file system and its drain on `docker stop` are checked on the
running container. For one version, a change to what the dependencies stage makes (its commands
edited, a dependency added and locked) reaches the image."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import tomllib
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from ..containers import standins
from ..containers.engines import Docker, Podman
from ..helpers import COMBOS, Combo, free_port
from ..project import expected_workers
from ..services import children_of
from .containers import (
    MARKS,
    SLOW_COMMAND,
    Build,
    build,
    buildable,
    fresh_dir,
    health,
    lock,
    logs,
    release_image,
    report,
    slow_app_dir,
    state,
    wait_until,
)
from .support import Generated, healthcheck_command

pytestmark = MARKS

# compose.yaml's security settings for the app, as `docker run` options.
HARDENED = [
    "--read-only",
    "--tmpfs=/tmp",
    "--cap-drop=ALL",
    "--security-opt=no-new-privileges:true",
]
# The image's HEALTHCHECK command, checked every second instead of every 30 (compose.yaml's
# start_interval does the same on Docker Engine 25+): its test command is not changed.
FAST_HEALTH = [
    "--health-interval=1s",
    "--health-timeout=5s",
    "--health-retries=3",
    "--health-start-period=30s",
]
MB = 1_000_000

# Prints the package's modules whose bytecode is missing or would not be used: a timestamp pyc
# whose recorded source mtime and size differ from the source's (as importlib checks).
STALE_BYTECODE = """\
import importlib.util, pathlib, {package} as package
stale = []
for source in sorted(pathlib.Path(package.__file__).parent.rglob("*.py")):
    cached = pathlib.Path(importlib.util.cache_from_source(str(source)))
    head = cached.read_bytes()[:16] if cached.exists() else b""
    st = source.stat()
    if head[4:8] != bytes(4) or head[8:16] != (
        (int(st.st_mtime) & 0xFFFFFFFF).to_bytes(4, "little")
        + (st.st_size & 0xFFFFFFFF).to_bytes(4, "little")
    ):
        stale.append(str(source))
print(stale)
"""


# The version whose image is rebuilt after its dependencies change. One is enough: what keys the
# dependency layer and the runtime stage's copy of it (the COPY of uv.lock, the RUN's command,
# the COPY of the virtualenv's digest) is the same text for every version, and podman the same
# engine; each version's own Dockerfile is built cold and rebuilt after a source change.
DEPENDENCY_CHANGES = "3.11"

# The steps of the runtime stage that copy the virtualenv: its digest, then the copy.
VENV_DIGEST = "COPY --from=dependencies /app/venv.sha256"
VENV_COPY = "cp -a /mnt/venv/. /app/.venv/"


def params() -> list[Any]:
    """For each Python version, the docker combination with the most features (the largest
    image)."""
    out = []
    for version in sorted({c.python_version for c in COMBOS}):
        combos = [c for c in COMBOS if c.deployment == "docker" and c.python_version == version]
        combo = max(combos, key=lambda c: (c.postgres + c.redis + c.sentry, c.postgres))
        out.append(pytest.param(combo, id=combo.id))
    return out


def status_of(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def mounts_of(pid: int) -> dict[str, tuple[str, str]]:
    """mount point -> (file system type, mount options), from the process's mountinfo."""
    out = {}
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields = line.split()
        separator = fields.index("-")
        out[fields[4]] = (fields[separator + 1], fields[5])
    return out


def compose_environment(project: Generated) -> dict[str, str]:
    app = yaml.safe_load(project.read("compose.yaml"))["services"]["app"]
    return {k: str(v) for k, v in app["environment"].items()}


def run_container(
    docker: Docker,
    project: Generated,
    image: str,
    name: str,
    port: int,
    options: tuple[str, ...] = (),
    command: tuple[str, ...] = (),
) -> str:
    docker(
        "run",
        "--detach",
        "--pull=never",
        f"--name={name}",
        *HARDENED,
        *FAST_HEALTH,
        # The app's settings as compose passes them: .env, then compose.yaml's environment.
        f"--env-file={project.path / '.env'}",
        *(f"--env={k}={v}" for k, v in compose_environment(project).items()),
        f"--network={docker.network}",
        f"--publish=127.0.0.1:{port}:8000",
        *options,
        image,
        *command,
    )
    return name


def wait_health(docker: Docker, container: str, wanted: str, timeout: float) -> float:
    return wait_until(
        lambda: health(docker, container) == wanted,
        f"{container} {wanted}",
        timeout,
        lambda: f"health {health(docker, container)!r}:\n{logs(docker, container)[-4000:]}",
    )


@pytest.mark.parametrize("combo", params())
def test_image(
    request: pytest.FixtureRequest,
    generated: Callable[[Combo], Generated],
    podman: Podman,
    docker: Docker,
    combo: Combo,
    tmp_path: Path,
) -> None:
    project = buildable(generated(combo), tmp_path / "project")
    image = release_image(project)
    figures: dict[str, Any] = {"python": combo.python_version, "combo": combo.id}

    # ------------------------------------------------ cold build, and what the service adds
    # No layer from an earlier build, and empty cache mounts (uv downloads every wheel).
    caches = fresh_dir(tmp_path, "buildah-")
    cold_started = time.time()
    cold = build(podman, project, image, "--no-cache", tmpdir=caches)

    def own_cache() -> str:
        """The later builds take as cache only the layers made since the cold build began: its
        own. The machine's image store keeps layers of other builds, those of another version of
        the Dockerfile among them; where several layers match a step, buildah takes one and does
        not look back, so a rebuild could continue on another build's layers and miss a step the
        Dockerfile changed since (as a first build after a change does). CI's store has no
        other builds."""
        return f"--cache-ttl={int(time.time() - cold_started) + 10}s"

    cached, _, printed = cold.step("--no-install-project")
    assert not cached and "Installed" in printed, printed
    base = standins.qualified(f"python:{combo.python_version}-slim")
    size, base_size = podman.size(image), podman.size(base)
    figures |= {
        "cold_build_s": round(cold.seconds, 1),
        "image_mb": round(size / MB, 1),
        "base_mb": round(base_size / MB, 1),
        "added_mb": round((size - base_size) / MB, 1),
    }
    # The runtime stage: the virtualenv and run-time files only.
    listing = podman(
        "run", "--rm", "--network=none", "--entrypoint=sh", image, "-c",
        "ls /usr/local/bin; ls -A /app; ls -A /root/.cache 2>&1; id -u",
    ).stdout  # fmt: skip
    # The service's bytecode, compiled in the builder, is what its modules load (the root file
    # system is read-only: Python could not write it at run time).
    stale = podman(
        "run", "--rm", "--network=none", "--entrypoint=python", image, "-c",
        STALE_BYTECODE.format(package=project.package),
    ).stdout.strip()  # fmt: skip
    assert stale == "[]", stale
    assert "uv" not in listing.split(), listing
    app_files = {"gunicorn.conf.py", ".venv"} | (
        {"alembic.ini", "migrations"} if combo.postgres else set()
    )
    assert app_files <= set(listing.split()) and "src" not in listing.split(), listing
    assert "No such file or directory" in listing and listing.split()[-1] == "10001", listing

    # ------------------------------------------------ rebuild after a change to one source file
    source = project.path / "src" / project.package / "api.py"
    # Unique to this run: a change an earlier run made is in the layer cache.
    source.write_text(source.read_text() + f"\n# a change to the code only: {uuid.uuid4()}\n")
    rebuilt = build(podman, project, image, own_cache(), tmpdir=caches)
    # The dependency layer comes from the cache (nothing installed); the code's steps do not.
    cached, _, printed = rebuilt.step("--no-install-project")
    assert cached and "Installed" not in printed, rebuilt.output[-4000:]
    assert rebuilt.step("COPY src ./src")[0] is False
    cached, _, printed = rebuilt.step("--target /service")
    assert not cached and "Installed 1 package" in printed, printed
    # The runtime stage's copy of the service is new.
    assert rebuilt.step("COPY --from=service /service")[0] is False, rebuilt.output[-8000:]
    figures |= {
        "rebuild_s": round(rebuilt.seconds, 1),
        "rebuild_ratio": round(rebuilt.seconds / cold.seconds, 2),
    }

    # ------------------------------------------------ run it as compose.yaml does
    docker.load(podman, image)
    port = free_port()
    container = run_container(docker, project, image, f"image-{combo.id}", port)
    figures["healthy_after_s"] = round(wait_health(docker, container, "healthy", 60), 1)
    # The image's own HEALTHCHECK command is the one Docker runs.
    test = docker("inspect", "--format", "{{json .Config.Healthcheck.Test}}", container).stdout
    assert json.loads(test) == ["CMD", *healthcheck_command(project.read("Dockerfile"))]

    master = int(state(docker, container)["Pid"])
    workers = children_of(master)
    assert len(workers) == expected_workers(combo), workers
    for pid in (master, *workers):
        status = status_of(pid)
        assert status["Uid"].split() == ["10001"] * 4 and status["Gid"].split() == ["10001"] * 4
        for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(status[caps], 16) == 0, (caps, status[caps])
        assert status["NoNewPrivs"] == "1"
    mounts = mounts_of(master)
    assert "ro" in mounts["/"][1].split(","), mounts["/"]
    assert mounts["/tmp"][0] == "tmpfs" and "rw" in mounts["/tmp"][1].split(","), mounts["/tmp"]
    # Even root (without capabilities) cannot write the root file system; the service can
    # write /tmp.
    denied = docker(
        "exec", "--user=0", container, "python", "-c", "open('/etc/probe', 'w')", check=False
    )
    assert denied.returncode != 0 and "Read-only file system" in denied.stderr, denied.stderr
    docker("exec", container, "python", "-c", "open('/tmp/probe', 'w').write('x')")

    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        assert client.get("/health/live").status_code == 200
        info = client.get("/api/v1/info", headers={"Host": project.domain})
        assert info.status_code == 200 and info.json()["environment"] == "production", info.text

    # ------------------------------------------------ unhealthy once it stops answering
    frozen = [master, *children_of(master)]
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        figures["unhealthy_after_s"] = round(wait_health(docker, container, "unhealthy", 60), 1)
    finally:
        for pid in reversed(frozen):
            os.kill(pid, signal.SIGCONT)
    figures["healthy_again_after_s"] = round(wait_health(docker, container, "healthy", 60), 1)
    docker("stop", "--time=40", container, timeout=60)
    assert state(docker, container)["ExitCode"] == 0, logs(docker, container)[-4000:]

    # ------------------------------------------------ `docker stop` drains in-flight requests
    figures |= drain(docker, project, image, f"drain-{combo.id}", tmp_path)

    if combo.python_version == DEPENDENCY_CHANGES:
        dependency_changes(podman, project, image, caches, own_cache)
    report(request, "image", figures)


def dependency_changes(
    podman: Podman, project: Generated, image: str, caches: Path, own_cache: Callable[[], str]
) -> None:
    """What the dependencies stage makes changes, and the runtime stage copies the new
    virtualenv: podman keys a RUN by its command and the layer below, never by what it mounts
    (or the content of a bind-mounted file), so the lock reaches the dependencies' step by a
    COPY and the virtualenv's digest reaches the runtime stage's copy of it by a COPY."""

    def in_image(tag: str, script: str) -> str:
        return podman(
            "run", "--rm", "--network=none", "--entrypoint=sh", tag, "-c", script
        ).stdout.strip()  # fmt: skip

    def copied_again(build: Build) -> None:
        cached, _, printed = build.step("--no-install-project")
        assert not cached and "Installed" in printed, build.output[-4000:]
        assert build.step(VENV_DIGEST)[0] is False, build.output[-8000:]
        assert build.step(VENV_COPY)[0] is False, build.output[-8000:]

    stubs = "find /app/.venv -name '*.pyi' | wc -l"
    assert in_image(image, stubs) == "0"
    # The stage's commands edited (as `copier update` may), the lock unchanged: type stubs kept.
    dockerfile = project.path / "Dockerfile"
    generated = dockerfile.read_text()
    edited = generated.replace("-name '*.pyi' -o ", "")
    assert edited != generated
    dockerfile.write_text(edited)
    kept = build(podman, project, f"{image}-stubs", own_cache(), tmpdir=caches)
    copied_again(kept)
    assert int(in_image(f"{image}-stubs", stubs)) > 0
    podman("rmi", f"{image}-stubs")
    dockerfile.write_text(generated)

    # A dependency added and locked: one the lock holds already, for the tests (iniconfig, of
    # pytest), so the lock changes and the image gains a package.
    pyproject = project.path / "pyproject.toml"
    text = pyproject.read_text()
    assert "\ndependencies = [\n" in text, text
    pyproject.write_text(
        text.replace("\ndependencies = [\n", '\ndependencies = [\n    "iniconfig>=2",\n')
    )
    lock(project)
    version = "python -c 'import importlib.metadata as m; print(m.version(\"iniconfig\"))'"
    assert "PackageNotFoundError" in podman(
        "run", "--rm", "--network=none", "--entrypoint=sh", image, "-c", version, check=False
    ).stderr  # fmt: skip
    relocked = build(podman, project, f"{image}-relocked", own_cache(), tmpdir=caches)
    copied_again(relocked)
    locked = {p["name"]: p["version"] for p in tomllib.loads(project.read("uv.lock"))["package"]}
    assert in_image(f"{image}-relocked", version) == locked["iniconfig"]
    podman("rmi", f"{image}-relocked")


def drain(
    docker: Docker, project: Generated, image: str, name: str, tmp_path: Path
) -> dict[str, float]:
    """Slow requests in flight, then `docker stop`: every one completes with 200, the
    container exits 0, and the stop waited for them."""
    port = free_port()
    container = run_container(
        docker,
        project,
        image,
        name,
        port,
        options=(f"--volume={slow_app_dir(project, tmp_path)}:/slow:ro", "--env=PYTHONPATH=/slow"),
        command=tuple(SLOW_COMMAND),
    )
    wait_health(docker, container, "healthy", 60)
    slow_s, count = 4.0, 4
    results: list[Any] = []

    def call() -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            try:
                results.append(client.get(f"/api/v1/test/slow?seconds={slow_s}"))
            except httpx.HTTPError as exc:
                results.append(exc)

    threads = [threading.Thread(target=call) for _ in range(count)]
    sent = time.monotonic()
    for thread in threads:
        thread.start()
    wait_until(
        lambda: logs(docker, container).count("slow request started") == count,
        "slow requests in flight",
        10,
        lambda: logs(docker, container)[-4000:],
    )
    stopping = time.monotonic()
    docker("stop", "--time=40", container, timeout=60)
    stop_s = time.monotonic() - stopping
    for thread in threads:
        thread.join(timeout=30)
    assert len(results) == count
    failed = [r for r in results if not isinstance(r, httpx.Response) or r.status_code != 200]
    assert not failed, failed
    assert state(docker, container)["ExitCode"] == 0, logs(docker, container)[-4000:]
    # The stop lasted as long as the requests had left, not less (nor the 40 s of a kill).
    left = slow_s - (stopping - sent)
    assert left - 0.5 < stop_s < 30, (left, stop_s)
    return {"drain_requests": count, "drain_left_s": round(left, 1), "stop_s": round(stop_s, 1)}
