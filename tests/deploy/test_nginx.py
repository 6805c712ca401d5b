"""The nginx site: `nginx -t` accepts it in a sandbox (throwaway certificate, loopback ports),
and it has what issue 3 lists."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from ..helpers import Combo, free_port
from .support import (
    NGINX,
    SYSTEMD,
    Generated,
    NginxSandbox,
    nginx_sandbox,
    params,
    parse_env_file,
    parse_unit,
    unit_value,
)

pytestmark = pytest.mark.deploy


# nginx 1.25.1 and later deprecate `listen ... http2`, which the site uses for 1.22 (Debian 12).
HTTP2_DEPRECATED = re.compile(
    r".*\[warn\].*the \"listen \.\.\. http2\" directive is deprecated.*\n?"
)


def check_nginx(sandbox: NginxSandbox) -> None:
    """`nginx -t`: exit 0, and no error or warning (but the http2 deprecation of newer nginx)."""
    proc = subprocess.run(sandbox.command("-t", "-q"), capture_output=True, text=True, timeout=60)
    errors = sandbox.error_log.read_text() if sandbox.error_log.exists() else ""
    output = HTTP2_DEPRECATED.sub("", proc.stdout + proc.stderr + errors)
    if proc.returncode != 0 or output.strip():
        raise AssertionError(f"nginx -t failed ({proc.returncode}):\n{output}")


@pytest.mark.parametrize("combo", params(NGINX))
def test_nginx_config(
    generated: Callable[[Combo], Generated],
    combo: Combo,
    certificates: Callable[[str], Path],
    tmp_path: Path,
) -> None:
    """`nginx -t` accepts the site (throwaway certificate, upstream on a loopback port), and it
    has what issue 3 lists."""
    project = generated(combo)
    text = project.nginx_conf.read_text()
    check_nginx(
        nginx_sandbox(
            project,
            text,
            certificates(project.domain),
            tmp_path / "nginx",
            f"127.0.0.1:{free_port()}",
        )
    )

    conf = re.sub(r"#.*", "", text)
    for directive in (
        f"server_name {project.domain};",
        "ssl_protocols TLSv1.2 TLSv1.3;",
        "location ^~ /.well-known/acme-challenge/",
        "return 301 https://$server_name$request_uri;",
        'add_header Strict-Transport-Security "max-age=63072000; includeSubDomains" always;',
        'add_header X-Content-Type-Options "nosniff" always;',
        'add_header X-Frame-Options "DENY" always;',
        "add_header Referrer-Policy",
        "gzip_types application/json",
        "client_max_body_size",
        "limit_req_status 429;",
        "proxy_set_header Host $host;",
        "proxy_set_header X-Forwarded-For $remote_addr;",
        "proxy_set_header X-Forwarded-Proto $scheme;",
        "proxy_set_header X-Request-ID",
        'proxy_set_header Connection "";',
        "location ~ /\\.",
    ):
        assert directive in conf, directive
    # /health/ is neither rate limited nor logged; everything else is rate limited.
    health = re.search(r"location /health/ \{(.*?)\}", conf, re.S)
    assert health and "access_log off;" in health.group(1) and "limit_req" not in health.group(1)
    root = re.search(r"location / \{\n\s+limit_req zone=(\S+) burst=\d+ nodelay;", conf)
    assert root and f"zone={root.group(1)}:" in conf
    # Proxy timeouts outlast the service's own deadline, so a slow request gets the service's
    # 504 with its request id; nginx tries the upstream again on connection errors only, never
    # on a timeout (test_nginx_in_front_of_the_unit runs a slow GET).
    request_timeout = float(parse_env_file(project.read(".env.example"))["REQUEST_TIMEOUT"])
    for name in ("proxy_read_timeout", "proxy_send_timeout"):
        assert int(re.search(rf"{name} (\d+)s;", conf).group(1)) > request_timeout
    assert re.findall(r"proxy_next_upstream\s+([^;]*);", conf) == ["error"]
    upstream = re.search(r"upstream \S+ \{(.*?)\}", conf, re.S).group(1)
    if combo.deployment == "docker":
        # nginx drops idle upstream connections before gunicorn would close them under it.
        keepalive = re.search(r"^keepalive\s*=\s*(\d+)", project.read("gunicorn.conf.py"), re.M)
        assert "keepalive 16;" in upstream
        assert int(re.search(r"keepalive_timeout (\d+)s;", upstream).group(1)) < int(
            keepalive.group(1)
        )
    else:
        # Issue 16: no reused connection a stopping worker could close under a request.
        assert "keepalive" not in upstream
    if combo.deployment == "systemd":
        socket_unit = parse_unit(project.socket_unit.read_text())
        listen = unit_value(socket_unit, "Socket", "ListenStream")
        assert f"server unix:{listen} max_fails=0;" in conf, "nginx and the socket unit disagree"
    # nginx keeps a client's request id under the rule the service applies (middleware.py).
    service_rule = re.search(
        r'_VALID_REQUEST_ID = re\.compile\(rb"(.*)"\)',
        project.read(f"src/{project.package}/middleware.py"),
    ).group(1)
    request_id_map = re.search(r"map \$http_x_request_id \S+ \{(.*?)\}\n", conf, re.S).group(1)
    assert re.findall(r'"~\^(.*)\$" \$http_x_request_id;', request_id_map) == [service_rule]
    assert re.search(r"default\s+\$request_id;", request_id_map)
    # One upstream server listed twice, never marked failed: nginx's retry when a stopping worker
    # closes a connection it just used (see test_nginx_in_front_of_the_unit's reload).
    upstream = re.search(r"^upstream \S+ \{\n(.*?)^\}", conf, re.M | re.S)
    assert upstream, "no upstream block"
    servers = re.findall(r"^\s*server (\S+)(.*);$", upstream.group(1), re.M)
    assert len(servers) == 2 and servers[0] == servers[1], servers
    assert servers[0][1].split() == ["max_fails=0"], servers


def test_nginx_check_fails_on_a_broken_site(
    generated: Callable[[Combo], Generated], certificates: Callable[[str], Path], tmp_path: Path
) -> None:
    project = generated(SYSTEMD[0])
    sandbox = nginx_sandbox(
        project,
        project.nginx_conf.read_text(),
        certificates(project.domain),
        tmp_path / "nginx",
        "127.0.0.1:9",
    )
    check_nginx(sandbox)
    # nginx 1.22 (Debian 12) does not know the `http2` directive of 1.25.
    text = sandbox.site.read_text()
    listen = f"listen 127.0.0.1:{sandbox.https_port} ssl"
    sandbox.site.write_text(text.replace(f"{listen} http2;", f"{listen};\n    http2 on;"))
    assert sandbox.site.read_text() != text
    with pytest.raises(AssertionError, match="unknown directive"):
        check_nginx(sandbox)
