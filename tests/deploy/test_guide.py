"""The install guide (deploy/README.md): valid shell, consistent with the files it installs."""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from ..helpers import COMBOS, Combo, free_port
from .support import Generated, check, params, parse_env_file, parse_unit, tool, unit_value

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

    if combo.deployment == "docker":
        compose = yaml.safe_load(project.read("compose.yaml"))
        mounts = compose["services"]["nginx"]["volumes"]
        assert (
            f"{webroot}:{webroot}:ro" in mounts and "/etc/letsencrypt:/etc/letsencrypt:ro" in mounts
        )
        assert f"-v {webroot}:/usr/share/nginx/html:ro" in script
        assert f"cd /srv/{slug}\ncp .env.example .env" in script
        assert f"-f /srv/{slug}/compose.yaml exec -T nginx nginx -s reload" in script
        assert "docker compose up -d --build" in script
        return

    unit = parse_unit(project.unit.read_text())
    value = lambda key: unit_value(unit, "Service", key)  # noqa: E731
    user, group, workdir, env_file = (
        value("User"),
        value("Group"),
        value("WorkingDirectory"),
        value("EnvironmentFile"),
    )
    assert re.search(rf"useradd --system --user-group .* {re.escape(user)}\n", script)
    assert user == group  # --user-group: a group of the user's name
    assert f"usermod --append --groups {group} www-data" in script
    assert f"git clone YOUR-REPOSITORY-URL {workdir}\ncd {workdir}\n" in script
    sync = "uv sync --locked --no-dev --compile-bytecode"
    assert sync in script
    assert shlex.split(value("ExecStart"))[0] == f"{workdir}/.venv/bin/gunicorn"  # uv sync's .venv
    env_dir = str(Path(env_file).parent)
    assert f"install -d -m 0750 -o root -g {group} {env_dir}" in script
    assert f"install -m 0640 -o root -g {group} .env.example {env_file}" in script
    assert f"install -m 0644 deploy/systemd/{slug}.service /etc/systemd/system/" in script
    assert f"systemctl enable --now {slug}" in script
    assert f"install -m 0644 deploy/nginx/{slug}.conf /etc/nginx/sites-available/" in script
    assert f"ln -s ../sites-available/{slug}.conf /etc/nginx/sites-enabled/{slug}.conf" in script
    socket_path = shlex.split(value("ExecStart"))[
        shlex.split(value("ExecStart")).index("--bind") + 1
    ]
    assert f"--unix-socket {socket_path.removeprefix('unix:')}" in script
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
    port = free_port()
    sandbox_root = tmp_path / "acme"
    (sandbox_root / "webroot").mkdir(parents=True)
    (sandbox_root / "site.conf").write_text(
        acme.replace("listen 80;", f"listen 127.0.0.1:{port};").replace(
            webroot, str(sandbox_root / "webroot")
        )
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
