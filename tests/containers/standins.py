"""Local stand-ins for the images the generated Dockerfile and compose.yaml name, built from Debian
packages under those same names (no registry is reachable here): see README.md beside this file.

Each stand-in is a Debian bookworm root file system made by mmdebstrap (imported into podman)
plus its directory's Containerfile. Its image carries a label with the hash of every input; an
image whose label matches is reused, so they are built once per machine, not once per run."""

from __future__ import annotations

import fcntl
import hashlib
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..helpers import UV, python_for
from .engines import CACHE, Podman

HERE = Path(__file__).resolve().parent
LABEL = "org.copier-fastapi.stand-in"
CA_STORE = Path("/etc/ssl/certs/ca-certificates.crt")

# Debian packages of each root file system (minbase: apt, dpkg, coreutils, util-linux' setpriv).
ROOTFS_PACKAGES = {
    # What the pyenv builds load: OpenSSL, SQLite, libffi, compression, readline, uuid, gdbm.
    "python": (
        "ca-certificates",
        "netbase",
        "tzdata",
        "libssl3",
        "libsqlite3-0",
        "libffi8",
        "zlib1g",
        "libbz2-1.0",
        "liblzma5",
        "libreadline8",
        "libncursesw6",
        "libuuid1",
        "libgdbm6",
        "libexpat1",
    ),
    "postgres": ("postgresql-15",),
    "redis": ("redis-server",),
    "nginx": ("nginx-light",),
}

# Keeps the images small: no documentation, manual pages or translations.
DPKG_EXCLUDES = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/locale/*", "/usr/share/info/*")
# Debian's postgresql-common would create a cluster at install time; the entry point makes one.
ESSENTIAL_HOOK = (
    'mkdir -p "$1/etc/postgresql-common" && '
    'echo "create_main_cluster = false" > "$1/etc/postgresql-common/createcluster.conf"'
)

# Never copied into the Python stand-in: the test suite, static libraries, GUI modules, and
# whatever this machine installed into the interpreter's own site-packages.
PYTHON_EXCLUDES = ("test", "idlelib", "tkinter", "turtledemo", "site-packages", "config-*")


@dataclass
class StandIn:
    """One image under the name a generated file uses."""

    name: str  # its directory here
    image: str  # the name the generated files use, fully qualified
    rootfs: str | None  # a key of ROOTFS_PACKAGES, or None for FROM scratch
    build_args: dict[str, str] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)  # context path -> source file or dir

    def digest(self) -> str:
        h = hashlib.sha256()
        for path in sorted((HERE / self.name).iterdir()):
            h.update(path.name.encode() + path.read_bytes())
        if self.rootfs:
            h.update(rootfs_tag(self.rootfs).encode())
        h.update(repr(sorted(self.build_args.items())).encode())
        for target, source in sorted(self.files.items()):
            stat = source.stat()
            h.update(f"{target}:{source}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        return h.hexdigest()[:16]


def qualified(image: str) -> str:
    """An image name as Docker and podman store it: docker.io/library/ for official images."""
    first = image.split("/")[0]
    if "/" not in image:
        return f"docker.io/library/{image}"
    if "." not in first and ":" not in first and first != "localhost":
        return f"docker.io/{image}"
    return image


def rootfs_tag(key: str) -> str:
    h = hashlib.sha256(repr((ROOTFS_PACKAGES[key], DPKG_EXCLUDES, ESSENTIAL_HOOK)).encode())
    return f"localhost/copier-fastapi-rootfs-{key}:{h.hexdigest()[:16]}"


def uv_version() -> str:
    out = subprocess.run([str(UV), "--version"], capture_output=True, text=True, check=True)
    return out.stdout.split()[1]


def python_standin(version: str) -> StandIn:
    interpreter = python_for(version)
    prefix = interpreter.parent.parent  # ~/.pyenv/versions/3.X.Y
    return StandIn(
        "python",
        qualified(f"python:{version}-slim"),
        "python",
        {"PYENV_VERSION": prefix.name, "PYTHON_MINOR": version},
        {"root": prefix, "ca-certificates.crt": CA_STORE},
    )


def uv_standin(pinned: str) -> StandIn:
    """The uv image the Dockerfile pins must be the uv the suite runs: the stand-in carries it."""
    have = uv_version()
    if have != pinned:
        raise AssertionError(
            f"the Dockerfile pins ghcr.io/astral-sh/uv:{pinned}, the suite's uv ({UV}) is {have}: "
            "keep scripts/test's uv and the template's pin the same version"
        )
    return StandIn(
        "uv",
        f"ghcr.io/astral-sh/uv:{pinned}",
        None,
        files={"uv": UV, "uvx": UV.with_name("uvx")},
    )


def service_standin(image: str) -> StandIn:
    """postgres:..., redis:... or nginx:... under the tag compose.yaml names."""
    name = image.split(":")[0].split("/")[-1]
    assert name in ("postgres", "redis", "nginx"), image
    return StandIn(name, qualified(image), name)


def dockerfile_bases(dockerfile: str) -> list[str]:
    """The images the Dockerfile's FROM lines name (stage references left out)."""
    stages: set[str] = set()
    images = []
    for match in re.finditer(r"(?m)^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", dockerfile):
        image, stage = match.group(1), match.group(2)
        if image not in stages and image not in images:
            images.append(image)
        if stage:
            stages.add(stage)
    return images


def for_dockerfile(dockerfile: str) -> list[StandIn]:
    out = []
    for image in dockerfile_bases(dockerfile):
        if image.startswith("ghcr.io/astral-sh/uv:"):
            out.append(uv_standin(image.rpartition(":")[2]))
        elif match := re.fullmatch(r"python:(3\.\d+)-slim", image):
            out.append(python_standin(match.group(1)))
        else:
            raise AssertionError(f"no stand-in for {image}: add one to tests/containers/")
    return out


@contextmanager
def _locked() -> Iterator[None]:
    """One builder at a time on this machine (two suites side by side share the cache)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / "stand-ins.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _ensure_rootfs(podman: Podman, key: str) -> str:
    tag = rootfs_tag(key)
    if podman.exists(tag):
        return tag
    with tempfile.TemporaryDirectory(prefix="cf-rootfs-") as tmp:
        tarball = Path(tmp) / "rootfs.tar"
        cmd = [
            shutil.which("mmdebstrap") or "/usr/bin/mmdebstrap",
            "--variant=minbase",
            "--quiet",
            f"--include={','.join(ROOTFS_PACKAGES[key])}",
            *(f"--dpkgopt=path-exclude={p}" for p in DPKG_EXCLUDES),
            f"--essential-hook={ESSENTIAL_HOOK}",
            "bookworm",
            str(tarball),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise AssertionError(f"mmdebstrap for {key} failed:\n{proc.stdout}{proc.stderr}")
        podman("import", str(tarball), tag, timeout=300)
    return tag


def _context(standin: StandIn, directory: Path) -> None:
    shutil.copytree(HERE / standin.name, directory)
    for target, source in standin.files.items():
        if target == "root":  # the pyenv build, at its own path under /root
            prefix = source
            dest = directory / "root" / prefix.relative_to(Path.home())
            lib = f"python{standin.build_args['PYTHON_MINOR']}"

            def ignore(path: str, names: list[str], lib: str = lib) -> list[str]:
                if Path(path).name != lib:
                    return []
                return [n for n in names if any(Path(n).match(p) for p in PYTHON_EXCLUDES)]

            shutil.copytree(prefix, dest, symlinks=True, ignore=ignore)
        else:
            shutil.copy2(source, directory / target)


def ensure(podman: Podman, standin: StandIn) -> str:
    """The stand-in's image, built unless an image of the same inputs is already there."""
    digest = standin.digest()
    with _locked():
        if podman.exists(standin.image) and podman.label(standin.image, LABEL) == digest:
            return standin.image
        args = [f"--label={LABEL}={digest}"]
        if standin.rootfs:
            args.append(f"--build-arg=ROOTFS={_ensure_rootfs(podman, standin.rootfs)}")
        args += [f"--build-arg={k}={v}" for k, v in standin.build_args.items()]
        with tempfile.TemporaryDirectory(prefix="cf-standin-") as tmp:
            context = Path(tmp) / "context"
            _context(standin, context)
            podman.build(context, standin.image, *args, timeout=900)
    return standin.image
