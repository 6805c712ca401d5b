"""The systemd unit: `systemd-analyze verify` is silent, `systemd-analyze security` rates its
hardening OK, and it has what issue 3 lists."""

from __future__ import annotations

import re
import shlex
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from ..helpers import Combo
from .support import SYSTEMD, Generated, check, params, parse_unit, tool, unit_value

pytestmark = pytest.mark.deploy


def graceful_timeout(project: Generated) -> int:
    match = re.search(r"^graceful_timeout\s*=\s*(\d+)", project.read("gunicorn.conf.py"), re.M)
    assert match, "gunicorn.conf.py sets no graceful_timeout"
    return int(match.group(1))


def systemd_tree(project: Generated, root: Path, unit_text: str | None = None) -> str:
    """A root for `systemd-analyze --root`: the system's own units, the generated units (the
    service and its socket), and executables where the service's ExecStart= and ExecReload=
    point. Returns the service unit's name."""
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    name = project.unit.name
    (root / "etc/systemd/system").mkdir(parents=True)
    (root / "etc/systemd/system" / name).write_text(unit_text or project.unit.read_text())
    shutil.copy(project.socket_unit, root / "etc/systemd/system")
    unit = parse_unit(unit_text or project.unit.read_text())
    for key in ("ExecStart", "ExecReload"):
        executable = root / shlex.split(unit_value(unit, "Service", key))[0].lstrip("/")
        executable.parent.mkdir(parents=True, exist_ok=True)
        executable.write_text("#!/bin/sh\n")
        executable.chmod(0o755)
    return name


def check_systemd_verify(root: Path, name: str) -> None:
    # Exits 0 on unknown keys and bad values: the empty output is what proves the unit clean.
    check([tool("systemd-analyze"), "verify", "--man=no", f"--root={root}", name])


def check_systemd_security(root: Path, name: str) -> None:
    # Exposure 2.0 at most (systemd rates 0-10; the unit scores about 1.6, "OK").
    check(
        [
            tool("systemd-analyze"),
            "security",
            "--offline=yes",
            f"--root={root}",
            "--threshold=20",
            "--no-pager",
            name,
        ],
        quiet=False,
    )


@pytest.mark.parametrize("combo", params(SYSTEMD))
def test_systemd_unit(
    generated: Callable[[Combo], Generated], combo: Combo, tmp_path: Path
) -> None:
    """`systemd-analyze verify` is silent, `systemd-analyze security` rates the hardening OK,
    and the unit has what issue 3 lists."""
    project = generated(combo)
    name = systemd_tree(project, tmp_path / "root")
    check_systemd_verify(tmp_path / "root", name)
    check_systemd_verify(tmp_path / "root", project.socket_unit.name)
    check_systemd_security(tmp_path / "root", name)

    unit = parse_unit(project.unit.read_text())
    value = lambda key: unit_value(unit, "Service", key)  # noqa: E731
    slug = project.slug
    assert value("Type") == "notify" and value("NotifyAccess") == "main"
    assert value("User") == slug and value("Group") == f"{slug}-sock"
    assert value("WorkingDirectory") == f"/srv/{slug}"
    assert value("EnvironmentFile") == f"/etc/{slug}/{slug}.env"
    exec_start = shlex.split(value("ExecStart"))
    assert exec_start[:3] == [
        f"/srv/{slug}/.venv/bin/gunicorn",
        "-c",
        f"/srv/{slug}/gunicorn.conf.py",
    ]
    # Issue 16: the socket is systemd's, held across restarts; gunicorn binds nothing itself.
    assert "--bind" not in exec_start and not any(
        k == "RuntimeDirectory" for k, _ in unit["Service"]
    )
    socket_unit = parse_unit(project.socket_unit.read_text())
    socket_value = lambda key: unit_value(socket_unit, "Socket", key)  # noqa: E731
    assert socket_value("ListenStream") == f"/run/{slug}.sock"
    assert (socket_value("SocketUser"), socket_value("SocketGroup")) == ("root", f"{slug}-sock")
    assert socket_value("SocketMode") == "0660"
    assert unit_value(unit, "Unit", "Requires") == project.socket_unit.name
    assert project.socket_unit.name in unit_value(unit, "Unit", "After").split()
    assert value("ExecReload") == "/bin/kill -s HUP $MAINPID"
    assert value("Restart") == "on-failure" and int(value("RestartSec")) > 0
    assert value("KillMode") == "mixed"
    assert int(value("TimeoutStopSec")) > graceful_timeout(project)
    for key, expected in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "CapabilityBoundingSet": "",
        "LimitNOFILE": "65536",
    }.items():
        assert value(key) == expected, key
    # Issue 16: journald's rate limit is set for one line per request: at least 2,500 lines per
    # second for each of the 16 workers the automatic count allows, and still a limit.
    interval = value("LogRateLimitIntervalSec")
    assert re.fullmatch(r"[1-9]\d*s", interval), interval
    assert int(value("LogRateLimitBurst")) / int(interval[:-1]) >= 16 * 2500
    after = unit_value(unit, "Unit", "After").split()
    assert ("postgresql.service" in after) == combo.postgres
    assert ("redis-server.service" in after) == combo.redis


def test_systemd_checks_fail_on_broken_units(
    generated: Callable[[Combo], Generated], tmp_path: Path
) -> None:
    project = generated(SYSTEMD[0])
    text = project.unit.read_text()

    # A misspelt key: verify exits 0, but says so.
    root = tmp_path / "typo"
    name = systemd_tree(project, root, text.replace("\nType=notify\n", "\nTyp=notify\n"))
    with pytest.raises(AssertionError, match="Unknown key"):
        check_systemd_verify(root, name)

    # ExecStart pointing nowhere.
    root = tmp_path / "missing"
    name = systemd_tree(project, root)
    (root / "srv" / project.slug / ".venv/bin/gunicorn").unlink()
    with pytest.raises(AssertionError, match="not executable"):
        check_systemd_verify(root, name)

    # Without its hardening, the unit is exposed.
    root = tmp_path / "soft"
    soft = text.split("# Hardening:")[0] + "\n[Install]\nWantedBy=multi-user.target\n"
    name = systemd_tree(project, root, soft)
    check_systemd_verify(root, name)
    with pytest.raises(AssertionError):
        check_systemd_security(root, name)
