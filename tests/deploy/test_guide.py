"""The install guide (deploy/README.md): valid shell, consistent with the files it installs."""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from ..helpers import COMBOS, Combo, free_port, run
from .support import (
    DOCKER,
    SYSTEMD,
    Generated,
    check,
    params,
    parse_env_file,
    parse_unit,
    tool,
    unit_environment,
    unit_value,
)

pytestmark = pytest.mark.deploy


def shell_blocks(markdown: str) -> list[str]:
    return re.findall(r"```sh\n(.*?)```", markdown, re.S)


def bash_syntax(block: str) -> None:
    check(["bash", "-n", "-c", block])


@pytest.mark.parametrize("combo", params(COMBOS))
def test_deploy_guide(
    generated: Callable[[Combo], Generated], combo: Combo, tmp_path: Path
) -> None:
    """deploy/README.md: every command block is valid shell, and the paths, names and users it
    creates are the ones the unit, the nginx site and compose.yaml expect."""
    project = generated(combo)
    guide = project.read("deploy/README.md")
    blocks = shell_blocks(guide)
    assert blocks
    for block in blocks:
        bash_syntax(block)
    script = re.sub(r"[ \t]*\\\n\s*", " ", "\n".join(blocks))
    slug, domain = project.slug, project.domain
    if combo.deployment == "kubernetes":
        return  # no nginx site, no certbot: tests/deploy/test_kubernetes.py reads this guide
    site = re.sub(r"#.*", "", project.nginx_conf.read_text())
    webroot = re.search(r"location \^~ /\.well-known/acme-challenge/ \{\s*root (\S+);", site).group(
        1
    )
    assert f"certbot certonly --webroot -w {webroot} -d {domain}" in script
    assert f"/etc/letsencrypt/live/{domain}/" in site  # certbot's directory for -d {domain}
    assert "--deploy-hook" in script

    # Issue 16: the check after a deploy is readiness (liveness passes with a wrong REDIS_URL).
    assert f"curl -fsS https://{domain}/health/ready" in script
    assert "/health/live" not in script

    if combo.deployment == "docker":
        compose = yaml.safe_load(project.read("compose.yaml"))
        mounts = compose["services"]["nginx"]["volumes"]
        assert (
            f"{webroot}:{webroot}:ro" in mounts and "/etc/letsencrypt:/etc/letsencrypt:ro" in mounts
        )
        assert f"-v {webroot}:/usr/share/nginx/html:ro" in script
        assert f"cd /srv/{slug}\ncp .env.example .env" in script
        assert f"-f /srv/{slug}/compose.yaml exec -T nginx nginx -s reload" in script
        check_docker_releases(script, project, tmp_path)
        return

    # Issue 16: package lists refreshed before installing from them.
    assert "apt-get install" in script
    assert 0 <= script.find("apt-get update") < script.index("apt-get install")

    unit = parse_unit(project.unit.read_text())
    value = lambda key: unit_value(unit, "Service", key)  # noqa: E731
    user, group, workdir, env_file = (
        value("User"),
        value("Group"),
        value("WorkingDirectory"),
        value("EnvironmentFile"),
    )
    assert f"groupadd --system {group}\n" in script
    assert re.search(rf"useradd --system --gid {re.escape(group)} .* {re.escape(user)}\n", script)
    assert f"usermod --append --groups {group} www-data" in script
    assert f"git clone YOUR-REPOSITORY-URL {workdir}\ncd {workdir}\n" in script
    sync = "uv sync --locked --no-dev --compile-bytecode"
    assert sync in script
    assert shlex.split(value("ExecStart"))[0] == f"{workdir}/.venv/bin/gunicorn"  # uv sync's .venv
    env_dir = str(Path(env_file).parent)
    assert f"install -d -m 0700 -o root -g root {env_dir}" in script
    assert f"install -m 0600 -o root -g root /dev/stdin {env_file}" in script
    assert (
        f"install -m 0644 deploy/systemd/{slug}.service deploy/systemd/{slug}.socket "
        "/etc/systemd/system/"
    ) in script
    assert f"systemctl enable --now {slug}.socket {slug}.service" in script
    assert f"install -m 0644 deploy/nginx/{slug}.conf /etc/nginx/sites-available/" in script
    assert f"ln -s ../sites-available/{slug}.conf /etc/nginx/sites-enabled/{slug}.conf" in script
    socket_path = unit_value(parse_unit(project.socket_unit.read_text()), "Socket", "ListenStream")
    assert f"--unix-socket {socket_path}" in script
    if combo.postgres:
        database_url = parse_env_file(project.read(".env.example"))["DATABASE_URL"]
        db_user = re.match(r"postgresql\+asyncpg://([^:]+):", database_url).group(1)
        assert f"createuser --pwprompt {db_user}" in script
        assert (
            f"systemd-run --wait --pipe --collect --uid={user} --gid={group} "
            f"--working-directory={workdir} --property=EnvironmentFile={env_file} "
            f"{workdir}/.venv/bin/alembic upgrade head"
        ) in script

    # The temporary site that answers the first challenge is valid nginx, serving the webroot.
    acme = re.search(r"<<'EOF'\n(.*?)\nEOF", script, re.S).group(1)
    assert f"server_name {domain};" in acme and f"root {webroot};" in acme
    # Issue 16: IPv6 too, as the real site: Let's Encrypt tries an AAAA record first.
    assert sorted(re.findall(r"listen (\S+);", acme)) == ["80", "[::]:80"], acme
    assert sorted(re.findall(r"listen (\S+);", site.split("server {")[1])) == ["80", "[::]:80"]
    port = free_port()
    sandbox_root = tmp_path / "acme"
    (sandbox_root / "webroot").mkdir(parents=True)
    (sandbox_root / "site.conf").write_text(
        acme.replace("listen 80;", f"listen 127.0.0.1:{port};")
        .replace("listen [::]:80;", f"listen [::1]:{port};")
        .replace(webroot, str(sandbox_root / "webroot"))
    )
    (sandbox_root / "nginx.conf").write_text(
        f"pid {sandbox_root / 'nginx.pid'};\nevents {{}}\nhttp {{\n    access_log off;\n"
        f"    include {sandbox_root / 'site.conf'};\n}}\n"
    )
    check(
        [
            tool("nginx"),
            "-t",
            "-q",
            "-p",
            str(sandbox_root),
            "-c",
            str(sandbox_root / "nginx.conf"),
            "-e",
            str(sandbox_root / "error.log"),
        ]
    )


def check_docker_releases(script: str, project: Generated, tmp_path: Path) -> None:
    """Issue 16: the server pulls the release CI pushed, by its sha tag, and never builds: the
    first start and every update set APP_TAG to the commit checked out, then pull, then start;
    a rollback sets the previous tag. The first start is `docker compose up -d`; an update and
    a rollback are deploy/rollout.sh (never `up -d` or `restart`: both stop the app before its
    replacement serves), with the migrations run before an update's rollout only. The guide's
    own sed lines, run on .env.example, leave the tag compose interpolates."""
    assert "--build" not in script and "docker compose build" not in script
    assert "APP_TAG=latest" not in script
    assert "docker compose restart" not in script
    lines = script.splitlines()
    sets = [i for i, line in enumerate(lines) if "s|^APP_TAG=.*|APP_TAG=sha-" in line]
    assert len(sets) == 3, "first start, update and rollback each set the tag"
    starts_by_set = ("docker compose up -d", "deploy/rollout.sh", "deploy/rollout.sh")
    for i, start in zip(sets, starts_by_set, strict=True):
        following = lines[i + 1 : i + 6]
        starts = [n for n, line in enumerate(following) if line.startswith(start)]
        pulls = [n for n, line in enumerate(following) if line.startswith("docker compose pull")]
        assert starts and pulls and pulls[0] < starts[0], following
        if start == "deploy/rollout.sh":
            assert not any(line.startswith("docker compose up") for line in following), following
        migrations = [n for n, line in enumerate(following) if "compose run --rm migrate" in line]
        if project.combo.postgres and i == sets[1]:
            assert migrations and pulls[0] < migrations[0] < starts[0], following
        else:
            assert not migrations, following
    rollout = project.path / "deploy" / "rollout.sh"
    check(["bash", "-n", str(rollout)])
    repo = tmp_path / "checkout"
    repo.mkdir()
    run(["git", "init", "-q"], cwd=repo)
    run(["git", "commit", "-q", "--allow-empty", "-m", "release"], cwd=repo)
    head = run(["git", "rev-parse", "HEAD"], cwd=repo).stdout.strip()
    for i, expected in ((sets[0], f"sha-{head}"), (sets[2], "sha-PREVIOUS-COMMIT")):
        (repo / ".env").write_text(project.read(".env.example"))
        run(["bash", "-euc", lines[i]], cwd=repo)
        assert parse_env_file((repo / ".env").read_text())["APP_TAG"] == expected


def guide_script(project: Generated) -> str:
    """The guide's shell blocks as one script, continuation lines joined."""
    return re.sub(r"[ \t]*\\\n\s*", " ", "\n".join(shell_blocks(project.read("deploy/README.md"))))


def test_the_systemd_guide_pins_the_images_uv(generated: Callable[[Combo], Generated]) -> None:
    """Issue 16: the guide installs the uv version the Dockerfile's image pins, not the latest."""
    dockerfile = generated(DOCKER[0]).read("Dockerfile")
    pinned = re.search(r"^FROM ghcr\.io/astral-sh/uv:(\S+) AS uv$", dockerfile, re.M)
    assert pinned, "the Dockerfile pins no uv image"
    for combo in SYSTEMD:
        installs = re.findall(
            r"https://astral\.sh/uv/(?:([^/\s]+)/)?install\.sh", guide_script(generated(combo))
        )
        assert installs == [pinned.group(1)], (combo.id, installs)


@dataclass
class Node:
    owner: str
    group: str
    mode: int


def guide_permissions(project: Generated) -> tuple[dict[str, set[str]], dict[str, Node]]:
    """Who is in which group and who owns what, once the guide has run and the unit has
    started: ({group: members}, {path: Node}). Groups and users come from the guide's groupadd,
    useradd and usermod; directories and files from its `install -o -g`; the socket from the
    socket unit (systemd creates it with SocketUser=, SocketGroup= and SocketMode=)."""
    script = guide_script(project)
    unit = parse_unit(project.unit.read_text())
    groups: dict[str, set[str]] = {}
    for match in re.finditer(r"groupadd --system (\S+)", script):
        groups.setdefault(match.group(1), set())
    for match in re.finditer(r"useradd (.*) (\S+)$", script, re.M):
        options, user = match.group(1), match.group(2)
        if "--user-group" in options:
            groups.setdefault(user, set()).add(user)
        for option in ("--gid", "--groups"):
            found = re.search(rf"{option} (\S+)", options)
            for group in found.group(1).split(",") if found else ():
                groups.setdefault(group, set()).add(user)
    for match in re.finditer(r"usermod --append --groups (\S+) (\S+)", script):
        for group in match.group(1).split(","):
            groups.setdefault(group, set()).add(match.group(2))

    nodes: dict[str, Node] = {}
    for match in re.finditer(r"install -d -m (\d+) -o (\S+) -g (\S+) (\S+)", script):
        nodes[match.group(4)] = Node(match.group(2), match.group(3), int(match.group(1), 8))
    for match in re.finditer(r"install -m (\d+) -o (\S+) -g (\S+) \S+ (\S+)", script):
        nodes[match.group(4)] = Node(match.group(2), match.group(3), int(match.group(1), 8))
    assert "RuntimeDirectory" not in dict(unit["Service"]), "a runtime directory to model"
    socket_unit = parse_unit(project.socket_unit.read_text())
    socket_value = lambda key: unit_value(socket_unit, "Socket", key)  # noqa: E731
    nodes[socket_value("ListenStream")] = Node(
        socket_value("SocketUser"), socket_value("SocketGroup"), int(socket_value("SocketMode"), 8)
    )
    return groups, nodes


def may(
    groups: dict[str, set[str]], nodes: dict[str, Node], user: str, path: str, bit: int
) -> bool:
    """Whether `user` may search every directory above `path` and has `bit` (4 read, 2 write:
    connecting to a socket) on it. Paths the guide does not create are taken as world-readable."""
    if user == "root":
        return True
    member_of = {group for group, members in groups.items() if user in members}

    def allows(node: Node, want: int) -> bool:
        shift = 6 if node.owner == user else 3 if node.group in member_of else 0
        return bool(node.mode >> shift & want)

    parents = [str(p) for p in Path(path).parents]
    if not all(allows(nodes[p], 1) for p in parents if p in nodes):
        return False
    return path not in nodes or allows(nodes[path], bit)


@pytest.mark.parametrize("combo", params(SYSTEMD))
def test_systemd_guide_who_can_read_what(
    generated: Callable[[Combo], Generated], combo: Combo
) -> None:
    """Issue 16: once the guide has run, nginx's user reaches the socket and nothing else of
    the service's: the env file (DATABASE_URL, SECRET_KEY, SENTRY_DSN) is root's alone, as the
    guide's table says, and no other user reaches the socket."""
    project = generated(combo)
    unit = parse_unit(project.unit.read_text())
    value = lambda key: unit_value(unit, "Service", key)  # noqa: E731
    env_file, service_user = value("EnvironmentFile"), value("User")
    socket_path = unit_value(parse_unit(project.socket_unit.read_text()), "Socket", "ListenStream")
    groups, nodes = guide_permissions(project)

    assert env_file in nodes, "the guide does not create the env file"
    assert may(groups, nodes, "www-data", socket_path, 2), "nginx cannot reach the socket"
    assert not may(groups, nodes, "nobody", socket_path, 2), "anyone reaches the socket"
    assert may(groups, nodes, "root", env_file, 4)
    for user in ("www-data", service_user, "nobody"):
        assert not may(groups, nodes, user, env_file, 4), f"{user} can read the secrets"
    # The socket's group serves the socket alone: the service's files are not in it.
    assert value("Group") in groups and "www-data" in groups[value("Group")]

    # The table says the same.
    guide = project.read("deploy/README.md")
    row = next(line for line in guide.splitlines() if line.startswith("|") and env_file in line)
    assert row.rstrip().endswith("| root only |"), row
    row = next(line for line in guide.splitlines() if line.startswith("|") and socket_path in line)
    assert f"`{value('Group')}` group" in row and "www-data" in row, row


@pytest.mark.parametrize("combo", params(SYSTEMD))
def test_systemd_service_runs_in_production(
    generated: Callable[[Combo], Generated], combo: Combo, tmp_path: Path
) -> None:
    """Issue 16: the environment systemd gives the service once the guide has installed the env
    file is production. systemd.exec(5): "Settings from these files [EnvironmentFile=] override
    settings made with Environment=", so the unit's ENVIRONMENT only counts if the file the
    guide writes does not set one."""
    project = generated(combo)
    unit = parse_unit(project.unit.read_text())
    env_file = unit_value(unit, "Service", "EnvironmentFile")
    # The guide's command that writes the env file, run here: same input, a temporary output
    # (ownership is test_systemd_guide_who_can_read_what's business).
    (command,) = [
        line
        for line in guide_script(project).splitlines()
        if re.search(rf"install .*\S+ {re.escape(env_file)}$", line)
    ]
    target = tmp_path / "service.env"
    command = re.sub(r"-o \S+ -g \S+ ", "", command.replace("sudo ", "")).replace(
        env_file, str(target)
    )
    run(["bash", "-c", command], cwd=project.path)
    environment = {**unit_environment(unit), **parse_env_file(target.read_text())}
    assert environment.get("ENVIRONMENT") == "production", environment.get("ENVIRONMENT")
    assert target.stat().st_mode & 0o777 == 0o600
