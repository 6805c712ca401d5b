"""compose.yaml: `docker-compose config` and the compose-spec schema accept it with .env copied
from .env.example (and the release set); its services follow the answers, and run the image CI
pushes."""

from __future__ import annotations

import json
import os
import re
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ..helpers import ALL_ENABLED, Combo, free_port, run, started
from .support import (
    DOCKER,
    RELEASE,
    Generated,
    check,
    check_jsonschema,
    ci_pushed_image,
    connects,
    params,
    parse_env_file,
    tool,
)

pytestmark = pytest.mark.deploy


def compose_config(project: Path) -> dict[str, Any]:
    """`docker-compose config` as JSON (interpolated, anchors merged)."""
    proc = check([tool("docker-compose"), "config", "--format", "json"], cwd=project, quiet=False)
    return dict(json.loads(proc.stdout))


def with_example_env(project: Generated, dst: Path) -> Generated:
    """A copy whose .env is .env.example with the release set, as the guide sets it, and nothing
    else: what compose sees before any secret is set."""
    copy = project.copy(dst)
    example = (copy.path / ".env.example").read_text()
    assert re.search(r"(?m)^APP_TAG=$", example), "APP_TAG is no longer empty in .env.example"
    (copy.path / ".env").write_text(re.sub(r"(?m)^APP_TAG=$", f"APP_TAG={RELEASE}", example))
    return copy


def check_compose(project: Path) -> None:
    check([tool("docker-compose"), "config", "-q"], cwd=project)


def check_compose_schema(compose: Path) -> None:
    check_jsonschema("vendor.compose-spec", compose)


def check_redis_memory_bound(command: list[str], directory: Path) -> None:
    """Issue 16: compose's Redis, started with compose's own arguments (on a loopback port),
    has a memory limit and evicts under it rather than growing without bound."""
    assert command[0] == "redis-server"
    directory.mkdir()
    port = free_port()
    args = [
        tool("redis-server"),
        *command[1:],
        *("--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory)),
    ]
    log = directory / "redis.log"
    with started(args, directory, os.environ, log, lambda: connects(("127.0.0.1", port)), 10):
        cli = [tool("redis-cli"), "-p", str(port), "config", "get"]
        maxmemory = run([*cli, "maxmemory"]).stdout.split()
        policy = run([*cli, "maxmemory-policy"]).stdout.split()
    assert int(maxmemory[1]) > 0, maxmemory
    assert policy[1].startswith("allkeys-"), policy  # a cache: evicts, never refuses a write


def check_release_image(project: Generated, services: dict[str, Any]) -> None:
    """Issue 16: the app (and migrate) run the image CI pushes, at the tag .env names, and no
    service builds one: a server pulls its release. compose.build.yaml alone builds it, under
    the same name, for development."""
    env = parse_env_file(project.read(".env"))
    pushed, tags = ci_pushed_image(project)
    assert env["APP_IMAGE"] == pushed, f"compose runs {env['APP_IMAGE']}, CI pushes {pushed}"
    assert "type=sha,format=long" in tags  # sha-<full commit hash>: RELEASE's form
    runs = [name for name in ("app", "migrate") if name in services]
    for name in runs:
        assert services[name]["image"] == f"{pushed}:{RELEASE}", services[name]["image"]
    built = [name for name, service in services.items() if "build" in service]
    assert not built, f"compose.yaml builds {built}: a server must pull its release"

    files = ["-f", "compose.yaml", "-f", "compose.build.yaml"]
    proc = check(
        [tool("docker-compose"), *files, "config", "--format", "json"],
        cwd=project.path,
        quiet=False,
    )
    development = json.loads(proc.stdout)["services"]
    for name in runs:
        assert development[name]["build"]["context"] == str(project.path), name
        assert development[name]["image"] == f"{pushed}:{RELEASE}"
    others = [name for name in development if name not in runs]
    assert not [name for name in others if "build" in development[name]], "builds too much"


@pytest.mark.parametrize("combo", params(DOCKER))
def test_compose(generated: Callable[[Combo], Generated], combo: Combo, tmp_path: Path) -> None:
    """`docker compose config` and the compose-spec schema accept compose.yaml, with .env copied
    from .env.example; the services, health checks and start order follow the answers, and no
    secret is written in compose.yaml."""
    project = with_example_env(generated(combo), tmp_path / "project")
    check_compose(project.path)
    check_compose_schema(project.path / "compose.yaml")

    config = compose_config(project.path)
    services = config["services"]
    expected = {"app", "nginx"} | ({"db", "migrate"} if combo.postgres else set())
    expected |= {"redis"} if combo.redis else set()
    assert set(services) == expected

    app = services["app"]
    assert app["restart"] == "unless-stopped"
    check_release_image(project, services)
    assert app["healthcheck"]["test"][0] == "CMD"
    assert "ports" not in app, "the app is reached through nginx only"
    # env_file: the application's settings (its secrets included) come from .env.
    env_example = parse_env_file(project.read(".env.example"))
    assert app["environment"]["SECRET_KEY"] == env_example["SECRET_KEY"]
    depends = {name: dep["condition"] for name, dep in app.get("depends_on", {}).items()}
    want = (
        {"db": "service_healthy", "migrate": "service_completed_successfully"}
        if combo.postgres
        else {}
    )
    want |= {"redis": "service_healthy"} if combo.redis else {}
    assert depends == want
    for name in ("db", "redis"):
        if name in services:
            assert services[name]["healthcheck"]["test"][0] == "CMD"
            assert re.search(r":\d+\.\d+(\.\d+)?-", services[name]["image"]), "pin the image"
            assert services[name]["volumes"][0]["type"] == "volume"
    if combo.postgres:
        assert services["migrate"]["command"] == ["alembic", "upgrade", "head"]
        assert services["migrate"]["depends_on"]["db"]["condition"] == "service_healthy"
        # Interpolated from .env: the same password the application's DATABASE_URL carries.
        password = services["db"]["environment"]["POSTGRES_PASSWORD"]
        assert password == env_example["POSTGRES_PASSWORD"]
        assert f":{password}@db:5432/" in env_example["DATABASE_URL"]

    nginx = services["nginx"]
    assert {p["target"] for p in nginx["ports"]} == {80, 443}
    assert nginx["depends_on"]["app"]["condition"] == "service_healthy"
    mounts = {v["target"]: v for v in nginx["volumes"]}
    site = mounts["/etc/nginx/conf.d/default.conf"]
    assert Path(site["source"]) == project.nginx_conf and site["read_only"]

    # Issue 16: no log grows without limit (the app writes a line per request).
    for name, service in services.items():
        logging = service.get("logging", {})
        assert logging.get("driver") == "json-file", f"{name}: {logging}"
        options = logging.get("options", {})
        assert re.fullmatch(r"\d+[km]", options.get("max-size", "")), f"{name}: {options}"
        assert int(options.get("max-file", "0")) >= 2, f"{name}: {options}"

    if combo.redis:
        check_redis_memory_bound(services["redis"]["command"], tmp_path / "redis")

    # Issue 16: the guide's IPv6 network for compose.yaml ("Client addresses") is valid compose.
    (snippet,) = [
        block
        for block in re.findall(r"```yaml\n(.*?)```", project.read("deploy/README.md"), re.S)
        if "enable_ipv6" in block
    ]
    compose_file = project.path / "compose.yaml"
    original = compose_file.read_text()
    compose_file.write_text(original + "\n" + textwrap.dedent(snippet))
    try:
        assert compose_config(project.path)["networks"]["default"]["enable_ipv6"] is True
    finally:
        compose_file.write_text(original)

    text = project.read("compose.yaml")
    for key, value in env_example.items():
        if "change-me" in value:
            assert value not in text, f"{key}'s value is written in compose.yaml"
    assert not re.search(r"(?im)^\s*(SECRET_KEY|SENTRY_DSN|DATABASE_URL)\s*:", text)


def test_rollout_script_passes_shellcheck(
    generated: Callable[[Combo], Generated], tmp_path: Path
) -> None:
    """deploy/rollout.sh passes shellcheck at every severity; a copy with an unquoted expansion
    (word splitting, SC2086) does not, so the check is live."""
    script = generated(ALL_ENABLED["docker"]).path / "deploy" / "rollout.sh"
    shellcheck = [tool("shellcheck"), "--severity=style", "--shell=bash"]
    check([*shellcheck, str(script)])
    broken = tmp_path / "rollout.sh"
    broken.write_text(script.read_text() + "\nrm -f $1\n")
    with pytest.raises(AssertionError, match="SC2086"):
        check([*shellcheck, str(broken)])


def test_compose_checks_fail_on_broken_copies(
    generated: Callable[[Combo], Generated], tmp_path: Path
) -> None:
    project = with_example_env(generated(ALL_ENABLED["docker"]), tmp_path / "project")
    compose = project.path / "compose.yaml"
    text = compose.read_text()

    # A dependency on a service that does not exist.
    compose.write_text(
        text.replace("      redis:\n        condition", "      cache:\n        condition")
    )
    assert compose.read_text() != text
    with pytest.raises(AssertionError, match="cache"):
        check_compose(project.path)

    # A key the compose specification does not have.
    compose.write_text(text.replace("    restart: unless-stopped", "    restart_policy: always", 1))
    with pytest.raises(AssertionError, match="restart_policy"):
        check_compose_schema(compose)

    # No release in .env (as .env.example has it): no compose command runs.
    compose.write_text(text)
    env = project.path / ".env"
    released = env.read_text()
    env.write_text(re.sub(r"(?m)^APP_TAG=.*$", "APP_TAG=", released))
    with pytest.raises(AssertionError, match=r"set APP_TAG in \.env"):
        check_compose(project.path)
    env.write_text(released)

    # compose.yaml building the image again: the server would run what is checked out.
    compose.write_text(text.replace("x-app: &app\n", "x-app: &app\n  build: .\n"))
    assert compose.read_text() != text
    with pytest.raises(AssertionError, match="builds"):
        check_release_image(project, compose_config(project.path)["services"])

    # The database password missing from .env: compose refuses to start without it.
    compose.write_text(text)
    env = project.path / ".env"
    env.write_text(re.sub(r"(?m)^POSTGRES_PASSWORD=.*\n", "", env.read_text()))
    with pytest.raises(AssertionError, match=r"set POSTGRES_PASSWORD in \.env"):
        check_compose(project.path)
