"""Throwaway PostgreSQL and Redis servers on free loopback ports, from the local binaries."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .helpers import free_port


def _pg_bindir() -> Path:
    found = shutil.which("pg_ctl")
    if found:
        return Path(os.path.realpath(found)).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if not candidates:
        raise RuntimeError(
            "PostgreSQL binaries not found: apt-get install postgresql (scripts/test does)"
        )
    return Path(candidates[-1]).parent


@dataclass
class Postgres:
    host: str
    port: int
    user: str
    bindir: Path

    def url(self, database: str, driver: str = "postgresql") -> str:
        return f"{driver}://{self.user}@{self.host}:{self.port}/{database}"

    def psql(self, sql: str, database: str = "postgres") -> None:
        subprocess.run(
            [
                str(self.bindir / "psql"),
                "-h",
                self.host,
                "-p",
                str(self.port),
                "-U",
                self.user,
                "-d",
                database,
                "-v",
                "ON_ERROR_STOP=1",
                "-q",
                "-c",
                sql,
            ],
            check=True,
            capture_output=True,
            text=True,
        )

    def create_database(self, name: str) -> str:
        self.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.psql(f'CREATE DATABASE "{name}"')
        return self.url(name)


def _as_postgres_user() -> list[str]:
    # initdb refuses to run as root: drop to the postgres system user when we are root.
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam("postgres")
    except KeyError as exc:
        raise RuntimeError(
            "running as root needs the 'postgres' system user (apt-get install postgresql)"
        ) from exc
    return ["runuser", "-u", "postgres", "--"]


def redis_command(binary: str, port: int, base: Path) -> list[str]:
    """redis-server on a loopback port, nothing persisted, its files in `base`."""
    settings = {"port": str(port), "bind": "127.0.0.1", "save": "", "appendonly": "no"}
    settings["dir"] = str(base)
    return [binary, *(arg for key, value in settings.items() for arg in (f"--{key}", value))]


def initdb(bindir: Path, data: Path, prefix: list[str]) -> None:
    """A new PostgreSQL cluster in `data`: user postgres, trust on loopback, UTF-8, no fsync."""
    subprocess.run(
        [
            *prefix,
            str(bindir / "initdb"),
            *("-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8"),
        ],
        check=True,
        capture_output=True,
    )


@contextmanager
def postgres_server() -> Iterator[Postgres]:
    bindir = _pg_bindir()
    base = Path(tempfile.mkdtemp(prefix="tpl-pg-"))
    data = base / "data"
    prefix = _as_postgres_user()
    if prefix:
        shutil.chown(base, "postgres", "postgres")
    port = free_port()
    initdb(bindir, data, prefix)
    log = base / "server.log"
    subprocess.run(
        [
            *prefix,
            str(bindir / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(log),
            "-w",
            "-t",
            "60",
            "start",
            "-o",
            f"-h 127.0.0.1 -p {port} -k {base} -F -c fsync=off -c full_page_writes=off "
            "-c synchronous_commit=off -c max_connections=300",
        ],
        check=True,
        capture_output=True,
    )
    try:
        yield Postgres("127.0.0.1", port, "postgres", bindir)
    finally:
        subprocess.run(
            [*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True,
        )
        shutil.rmtree(base, ignore_errors=True)


@dataclass
class Redis:
    host: str
    port: int

    def url(self, db: int = 0) -> str:
        return f"redis://{self.host}:{self.port}/{db}"


@contextmanager
def redis_server() -> Iterator[Redis]:
    binary = shutil.which("redis-server")
    if not binary:
        raise RuntimeError(
            "redis-server not found: apt-get install redis-server (scripts/test does)"
        )
    base = Path(tempfile.mkdtemp(prefix="tpl-redis-"))
    port = free_port()
    proc = subprocess.Popen(
        [*redis_command(binary, port, base), "--databases", "64"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        import socket

        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {port}")
            time.sleep(0.05)
        yield Redis("127.0.0.1", port)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(base, ignore_errors=True)
