"""What the deploy modules share: the checking tools, the renderings' type, the parsers of
more than one module, and the sandbox in which nginx runs a generated site."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from check_jsonschema.cli.main_command import main as check_jsonschema_main
from click.testing import CliRunner

from ..helpers import COMBOS, UV, Combo, free_port

DOCKER = [c for c in COMBOS if c.deployment == "docker"]
SYSTEMD = [c for c in COMBOS if c.deployment == "systemd"]
KUBERNETES = [c for c in COMBOS if c.deployment == "kubernetes"]
# The deployments that run the Dockerfile's image, and those behind the generated nginx site.
IMAGE = DOCKER + KUBERNETES
NGINX = DOCKER + SYSTEMD

# The release a server sets in .env before its first start (deploy/README.md, "Start"), as CI
# tags it: sha-<full commit hash>. .env.example leaves APP_TAG empty, so that no compose command
# runs an image nobody chose.
RELEASE = "sha-" + "0123456789abcdef" * 2 + "01234567"


def params(combos: list[Combo]) -> list[Any]:
    """One param per combination, grouped so that a single xdist worker renders each one."""
    return [
        pytest.param(c, id=c.id, marks=pytest.mark.xdist_group(f"deploy-{c.id}")) for c in combos
    ]


# ---------------------------------------------------------------- tools and renderings


def tool(name: str) -> str:
    """A checking tool: from the dev virtualenv, else PATH (and sbin). Missing is a failure."""
    for candidate in (Path(sys.executable).parent / name, Path("/usr/sbin") / name):
        if candidate.exists():
            return str(candidate)
    found = shutil.which(name)
    if not found:
        pytest.fail(f"{name} not found: `bash scripts/test` installs every checking tool")
    return found


def uv() -> str:
    if UV.exists():
        return str(UV)
    found = shutil.which("uv")
    if not found:
        pytest.fail(f"uv not found ({UV} or PATH): `bash scripts/test` installs it")
    return found


@dataclass
class Generated:
    combo: Combo
    path: Path
    answers: dict[str, Any]

    @property
    def slug(self) -> str:
        return str(self.answers["project_slug"])

    @property
    def package(self) -> str:
        return str(self.answers["package_name"])

    @property
    def domain(self) -> str:
        return str(self.answers["domain"])

    @property
    def nginx_conf(self) -> Path:
        return self.path / "deploy" / "nginx" / f"{self.slug}.conf"

    @property
    def unit(self) -> Path:
        return self.path / "deploy" / "systemd" / f"{self.slug}.service"

    @property
    def socket_unit(self) -> Path:
        return self.path / "deploy" / "systemd" / f"{self.slug}.socket"

    def read(self, relative: str) -> str:
        return (self.path / relative).read_text()

    def copy(self, dst: Path) -> Generated:
        """A copy to modify: the rendering itself is shared and stays untouched."""
        shutil.copytree(self.path, dst, symlinks=True, ignore=shutil.ignore_patterns(".venv"))
        return Generated(self.combo, dst, self.answers)


def check(
    cmd: list[str], cwd: Path | None = None, env: dict[str, str] | None = None, quiet: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run a checking tool; it must exit 0 and, when `quiet`, print nothing at all."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, text=True, capture_output=True, timeout=120)
    if proc.returncode != 0 or (quiet and (proc.stdout.strip() or proc.stderr.strip())):
        raise AssertionError(
            f"{shlex.join(cmd)} exited {proc.returncode} in {cwd}:\n{proc.stdout}{proc.stderr}"
        )
    return proc


# The checks that passed in this worker: check_file's, and the HEALTHCHECK commands
# test_dockerfile has proven with an interpreter.
_passed: set[tuple[str, ...]] = set()


def check_jsonschema(schema: str, path: Path) -> None:
    """check-jsonschema's own command line, run in this process: its start-up (about a second
    and a half) is paid once per worker instead of once per file."""
    result = CliRunner().invoke(check_jsonschema_main, ["--builtin-schema", schema, str(path)])
    if result.exit_code != 0:
        raise AssertionError(
            f"check-jsonschema --builtin-schema {schema} {path} exited {result.exit_code}:\n"
            f"{result.output}{result.exception or ''}"
        )


def check_file(cmd: list[str], path: Path, quiet: bool = True) -> None:
    """`check` for a tool that reads one file and nothing else: a file with the same name and
    content as one that already passed (a rendering the answers do not change) is not checked
    twice. Failures are never remembered."""
    key = (*cmd, path.name, hashlib.sha256(path.read_bytes()).hexdigest())
    if key not in _passed:
        check([*cmd, str(path)], cwd=path.parent, quiet=quiet)
        _passed.add(key)


# ---------------------------------------------------------------- parsing helpers


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """A systemd unit as {section: [(key, value), ...]}, repeated keys kept in order."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            sections.setdefault(current, [])
            continue
        assert current is not None, f"key outside a section: {line}"
        key, _, value = line.partition("=")
        sections[current].append((key.strip(), value.strip()))
    return sections


def unit_value(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> str:
    values = [v for k, v in unit[section] if k == key]
    assert len(values) == 1, f"{section}.{key}: expected one value, got {values}"
    return values[0]


def parse_env_file(text: str) -> dict[str, str]:
    """KEY=VALUE lines, as systemd's EnvironmentFile= and compose's env_file read them."""
    env = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


def ci_pushed_image(project: Generated) -> tuple[str, str]:
    """The image the generated CI pushes (OWNER standing for the repository's owner) and the
    tags it gives it, from docker/metadata-action's step in .github/workflows/ci.yml."""
    steps = yaml.safe_load(project.read(".github/workflows/ci.yml"))["jobs"]["image"]["steps"]
    meta = next(s["with"] for s in steps if s.get("uses", "").startswith("docker/metadata-action"))
    return meta["images"].replace("${{ github.repository_owner }}", "OWNER"), meta["tags"]


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(
        r"\\\n\s*",
        " ",
        "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")),
    )
    out = []
    for line in joined.splitlines():
        if line.strip():
            instruction, _, args = line.strip().partition(" ")
            out.append((instruction.upper(), args.strip()))
    return out


def dockerfile_env(dockerfile: str) -> dict[str, str]:
    """ENV of the last stage."""
    instructions = dockerfile_instructions(dockerfile)
    last_from = max(i for i, (ins, _) in enumerate(instructions) if ins == "FROM")
    env: dict[str, str] = {}
    for ins, args in instructions[last_from:]:
        if ins == "ENV":
            for pair in shlex.split(args):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def healthcheck_command(dockerfile: str) -> list[str]:
    (args,) = [a for i, a in dockerfile_instructions(dockerfile) if i == "HEALTHCHECK"]
    match = re.search(r"\bCMD (\[.*\])$", args)
    assert match, f"HEALTHCHECK must use the exec form: {args}"
    return list(json.loads(match.group(1)))


def run_healthcheck(
    command: list[str], python: Path, port: int
) -> subprocess.CompletedProcess[str]:
    """The HEALTHCHECK command with the interpreter and port of this machine."""
    assert command[0] == "python" and "127.0.0.1:8000" in command[-1]
    cmd = [str(python), *command[1:-1], command[-1].replace("127.0.0.1:8000", f"127.0.0.1:{port}")]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


# ---------------------------------------------------------------- nginx in a sandbox


@dataclass
class NginxSandbox:
    root: Path
    conf: Path
    site: Path
    http_port: int
    https_port: int
    acme: Path
    access_log: Path
    error_log: Path

    def command(self, *args: str) -> list[str]:
        return [
            tool("nginx"),
            "-p",
            str(self.root),
            "-c",
            str(self.conf),
            "-e",
            str(self.error_log),
            *args,
        ]


def nginx_sandbox(
    project: Generated, site_text: str, certificate: Path, root: Path, upstream: str
) -> NginxSandbox:
    """The generated site with its paths and ports rewritten to `root` and loopback ports, and
    its upstream to `upstream`; included in a minimal nginx.conf like sites are."""
    root.mkdir(parents=True, exist_ok=True)
    for sub in ("acme", "logs", "temp"):
        (root / sub).mkdir(exist_ok=True)
    http_port, https_port = free_port(), free_port()
    access_log = root / "logs" / "access.log"
    live = f"/etc/letsencrypt/live/{project.domain}"
    replacements = [
        (f"{live}/fullchain.pem", str(certificate / "fullchain.pem")),
        (f"{live}/privkey.pem", str(certificate / "privkey.pem")),
        ("root /var/www/letsencrypt;", f"root {root / 'acme'};"),
        ("listen 80;", f"listen 127.0.0.1:{http_port};"),
        ("listen [::]:80;", f"listen [::1]:{http_port};"),
        ("listen 443 ssl http2;", f"listen 127.0.0.1:{https_port} ssl http2;"),
        ("listen [::]:443 ssl http2;", f"listen [::1]:{https_port} ssl http2;"),
    ]
    if project.combo.deployment == "docker":
        replacements += [
            ("server app:8000 max_fails=0;", f"server {upstream} max_fails=0;"),
            ("access_log /dev/stdout ", f"access_log {access_log} "),
        ]
    else:
        replacements += [
            (
                f"server unix:/run/{project.slug}.sock max_fails=0;",
                f"server {upstream} max_fails=0;",
            ),
            (f"access_log /var/log/nginx/{project.slug}.access.log ", f"access_log {access_log} "),
        ]
    text = site_text
    for old, new in replacements:
        assert old in text, f"{old!r} not in the generated site"
        text = text.replace(old, new)
    # Nothing else points at the machine: every system path was rewritten.
    leftover = re.findall(r"(?<![\w.])/(?:etc|var|run|dev|srv|usr)/\S*", re.sub(r"#.*", "", text))
    assert not leftover, f"paths left after rewriting: {leftover}"
    site = root / "site.conf"
    site.write_text(text)
    temp = root / "temp"
    conf = root / "nginx.conf"
    # As root, workers would run as nobody, who cannot enter pytest's private temporary dirs.
    user = "user root;\n" if os.geteuid() == 0 else ""
    conf.write_text(
        f"{user}worker_processes 1;\npid {root / 'nginx.pid'};\n"
        "events { worker_connections 256; }\n"
        "http {\n"
        f"    access_log {root / 'logs' / 'default.log'};\n"
        f"    client_body_temp_path {temp / 'body'};\n    proxy_temp_path {temp / 'proxy'};\n"
        f"    fastcgi_temp_path {temp / 'fastcgi'};\n    uwsgi_temp_path {temp / 'uwsgi'};\n"
        f"    scgi_temp_path {temp / 'scgi'};\n"
        f"    include {site};\n"
        "}\n"
    )
    return NginxSandbox(
        root,
        conf,
        site,
        http_port,
        https_port,
        root / "acme",
        access_log,
        root / "logs" / "error.log",
    )


def unit_environment(unit: dict[str, list[tuple[str, str]]]) -> dict[str, str]:
    """The variables of the unit's Environment= lines."""
    env = {}
    for key, value in unit["Service"]:
        if key == "Environment":
            for pair in shlex.split(value):
                name, _, setting = pair.partition("=")
                env[name] = setting
    return env


def connects(address: tuple[str, int] | str) -> bool:
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family) as s:
        s.settimeout(1)
        try:
            s.connect(address)
        except OSError:
            return False
        return True
