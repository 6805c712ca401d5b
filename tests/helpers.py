"""Helpers for the template's suite: rendering, answer sets, interpreters, ports, processes."""

from __future__ import annotations

import fcntl
import glob
import itertools
import os
import signal
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from copier import run_copy

ROOT = Path(__file__).resolve().parent.parent
PYENV_ROOT = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
UV = ROOT / ".tools" / "bin" / "uv"


@dataclass(frozen=True)
class Combo:
    """One answer set of the matrix; its id doubles as the pytest id, so a CI line re-runs as is."""

    deployment: str
    postgres: bool
    redis: bool
    sentry: bool
    python_version: str
    workers: int

    @property
    def id(self) -> str:
        parts = [self.deployment]
        parts += [name for name in ("postgres", "redis", "sentry") if getattr(self, name)]
        parts += [f"py{self.python_version}", f"w{self.workers}"]
        return "-".join(parts)

    @property
    def answers(self) -> dict[str, Any]:
        return {
            "deployment": self.deployment,
            "postgres": self.postgres,
            "redis": self.redis,
            "sentry": self.sentry,
            "python_version": self.python_version,
            "workers": self.workers,
        }


def _matrix() -> list[Combo]:
    versions = ("3.11", "3.12", "3.13")
    workers = (0, 1, 2, 3)
    combos = []
    index = 0
    for deployment in ("docker", "systemd"):
        for postgres in (False, True):
            for redis in (False, True):
                for sentry in (False, True):
                    combos.append(
                        Combo(
                            deployment,
                            postgres,
                            redis,
                            sentry,
                            versions[index % len(versions)],
                            workers[index % len(workers)],
                        )
                    )
                    index += 1
    return combos


COMBOS: list[Combo] = _matrix()
COMBO_IDS = [c.id for c in COMBOS]
ALL_ENABLED = {
    d: next(c for c in COMBOS if c.deployment == d and c.postgres and c.redis and c.sentry)
    for d in ("docker", "systemd")
}


def render(dst: Path, answers: Mapping[str, Any] | None = None, **kwargs: Any) -> Path:
    """Render the working tree of the template (uncommitted changes included) into dst."""
    run_copy(
        str(ROOT),
        str(dst),
        data=dict(answers or {}),
        defaults=True,
        unsafe=True,
        vcs_ref="HEAD",
        quiet=True,
        **kwargs,
    )
    return dst


def python_for(version: str) -> Path:
    """The pyenv interpreter for a minor version; fails loudly when the machine lacks it."""
    candidates = sorted(
        glob.glob(str(PYENV_ROOT / "versions" / f"{version}.*" / "bin" / f"python{version}"))
    )
    if not candidates:
        raise RuntimeError(
            f"no Python {version} under {PYENV_ROOT}/versions: install it with pyenv"
        )
    return Path(candidates[-1])


PORT_BLOCK = 500
_port_block: tuple[int, Any] | None = None  # (first port, the open lock file that claims it)
_next_port = itertools.count()


def _claim_port_block() -> int:
    """The first port of a block of PORT_BLOCK loopback ports that this process alone hands
    out: blocks lie below the kernel's ephemeral range, and each is claimed with a lock file
    held for the life of the process (so xdist workers, and two suites run side by side, never
    share one)."""
    global _port_block
    if _port_block is None:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
        for first in range(20000, low - PORT_BLOCK + 1, PORT_BLOCK):
            lock = open(f"/tmp/copier-fastapi-ports-{first}.lock", "w")  # noqa: SIM115
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.close()
                continue
            _port_block = (first, lock)
            break
        else:
            raise RuntimeError(f"every block of {PORT_BLOCK} ports from 20000 to {low} is claimed")
    return _port_block[0]


def free_port() -> int:
    """A loopback port for a server that is about to start, handed to nobody else.

    A port the kernel picks (bind to port 0) comes from the ephemeral range, where another
    worker's bind to 0 or any outgoing connection's source port (a load drill opens thousands)
    can take it before the server binds it. These come one after another from this process's
    own block below that range; one still bound (a server left over from an earlier run) is
    passed over."""
    first = _claim_port_block()
    for _ in range(PORT_BLOCK):
        port = first + next(_next_port) % PORT_BLOCK
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"every port from {first} to {first + PORT_BLOCK - 1} is bound")


def run(
    cmd: list[str] | str,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 600,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run a command, and on failure raise with its whole output so the CI log says why."""
    proc = subprocess.run(
        cmd,
        cwd=cwd,
        env=dict(env) if env is not None else None,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=timeout,
        shell=isinstance(cmd, str),
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd!r} exited {proc.returncode} in {cwd}:\n{proc.stdout}")
    return proc


def json_lines(path: Path) -> list[str]:
    """The non-blank lines of a JSON-lines log. Lines end at \n alone: str.splitlines() would
    also cut inside a string at U+0085 or U+2028, which JSON leaves unescaped (schemathesis once
    sent such a path)."""
    return [line for line in path.read_text().split("\n") if line.strip()]


def stop(process: subprocess.Popen[bytes], timeout: float, group: bool = False) -> None:
    """SIGTERM (to its process group when group), then SIGKILL to the group after timeout.

    Processes are started with start_new_session=True, so the group is theirs alone."""
    if process.poll() is not None:
        return
    if group:
        os.killpg(process.pid, signal.SIGTERM)
    else:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
