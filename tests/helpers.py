"""Helpers for the template's suite: rendering, answer sets, interpreters, ports, processes."""

from __future__ import annotations

import contextlib
import fcntl
import glob
import itertools
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_copier import CopierFixture

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


DEPLOYMENTS = ("docker", "systemd", "kubernetes")


def _matrix() -> list[Combo]:
    versions = ("3.11", "3.12", "3.13")
    workers = (0, 1, 2, 3)
    combos = []
    index = 0
    for deployment in DEPLOYMENTS:
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
    for d in DEPLOYMENTS
}


def render(copier: CopierFixture, dst: Path, answers: Mapping[str, Any] | None = None) -> Path:
    """Render the session's template copy (pytest-copier's `copier_template`: the working tree,
    uncommitted changes included, committed in a scratch repository) into dst, with answers
    and the defaults for the rest.

    Through the fixture's Worker rather than CopierFixture.copy, which turns Copier's
    cleanup_on_error off (a rejected answer must leave no directory behind) and prints every
    file it writes."""
    worker = copier.worker(dst, **dict(answers or {}))
    worker.quiet = True
    with worker:
        worker.run_copy()
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


def environment(changes: Mapping[str, str | None]) -> dict[str, str]:
    """os.environ with changes applied; a None value removes the variable."""
    env = dict(os.environ)
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def wait_for(
    predicate: Callable[[], bool],
    what: str,
    process: subprocess.Popen[bytes],
    log: Path,
    timeout: float = 60,
) -> None:
    """Poll predicate until it holds; fail with the log's tail if the process exits first or
    the time runs out."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None:
            raise AssertionError(
                f"{what}: the process exited {process.returncode}:\n{log.read_text()[-6000:]}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s:\n{log.read_text()[-6000:]}")
        time.sleep(0.1)


@contextlib.contextmanager
def started(
    cmd: list[str],
    cwd: Path,
    env: Mapping[str, str],
    log: Path,
    ready: Callable[[], bool] | None = None,
    timeout: float = 90,
    stop_timeout: float = 40,
    pass_fds: tuple[int, ...] = (),
) -> Iterator[subprocess.Popen[bytes]]:
    """The one way the suite starts a server: cmd in a session of its own, stdout and stderr
    to log (and pass_fds inherited); once ready() holds (see wait_for), the process is yielded;
    afterwards it is stopped (see stop), whatever happened to it meanwhile."""
    with log.open("wb") as out:
        process = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=dict(env),
            stdout=out,
            stderr=out,
            start_new_session=True,
            pass_fds=pass_fds,
        )
    try:
        if ready is not None:
            wait_for(ready, f"{Path(cmd[0]).name} ready", process, log, timeout)
        yield process
    finally:
        stop(process, timeout=stop_timeout)


def stop(process: subprocess.Popen[Any], timeout: float) -> None:
    """SIGTERM to the process, SIGKILL to its process group after timeout; then whatever is
    left of the group (the workers of a master killed by a test) is killed too.

    Processes are started with start_new_session=True, so the group is theirs alone."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=timeout)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    if process.poll() is None:
        process.wait()
