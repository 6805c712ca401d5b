"""Prometheus metrics of running generated services (issue 13): exact totals across gunicorn
workers however they die, a bounded number of metric files, no series from unknown paths, the
endpoint on its own port, and a real Prometheus server reading the totals back; the guide's
scrape configuration with the shipped rules, against the metrics the service really exports."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import secrets
import signal
import string
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from pytest_copier import CopierFixture

from .helpers import COMBOS, free_port, started
from .project import Project, project_for
from .services import Service, http_request, serve

# No dependency to serve: the metrics do not depend on them.
COMBO = next(c for c in COMBOS if not (c.postgres or c.redis or c.sentry))
ROUTE = "/api/v1/info"


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
# A line of Prometheus' text format: name, {labels}, value (label values are plain here).
SAMPLE = re.compile(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def scrape(svc: Service) -> Samples:
    """Every sample the master's endpoint serves, keyed by name and labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{svc.metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            match = SAMPLE.fullmatch(line)
            assert match, line
            name, labels, value = match.groups()
            samples[(name, tuple(sorted(LABEL.findall(labels or ""))))] = float(value)
    return samples


def route_total(samples: Samples) -> float:
    return sum(
        value
        for (name, labels), value in samples.items()
        if name == "http_requests_total" and ("route", ROUTE) in labels
    )


@pytest.fixture(scope="module")
def project(copier_session: CopierFixture) -> Project:
    project = project_for(copier_session, COMBO)
    project.sync()
    return project


def service_env(directory: Path, **extra: str) -> dict[str, str | None]:
    return {
        "ENVIRONMENT": "production",
        "SECRET_KEY": secrets.token_urlsafe(48),
        "LOG_FORMAT": None,
        "WEB_CONCURRENCY": "2",
        "PROMETHEUS_MULTIPROC_DIR": str(directory),
        **extra,
    }


def settled(svc: Service, floor: int, timeout: float = 30) -> tuple[Samples, float, int]:
    """A scrape, the restarts it counts and the workers booted, once every worker the master
    has reaped has its replacement booted and at least `floor` restarts are counted. A worker
    that reached max_requests in the last batch exits on uvicorn's next tick (a worker shutting
    down can take a while: fresh-clone run 11 saw one still at it when the batches ended, after
    the two kills had both hit workers already recycling), possibly after the caller's checks:
    the master counts the restart as it reaps it, and the replacement logs "Booting worker" a
    moment later. With no request sent any more nothing else exits, so the two meet; a restart
    counted wrongly never does, and the caller's assertion then shows both."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(svc)
        restarts = samples[("gunicorn_worker_restarts_total", ())]
        booted = sum(1 for line in svc.log_lines() if "Booting worker" in str(line.get("event")))
        if restarts == booted - 2 >= floor and len(svc.worker_pids()) == 2:
            return samples, restarts, booted
        if time.monotonic() > deadline:
            return samples, restarts, booted
        time.sleep(0.1)


def send(svc: Service, count: int) -> int:
    """count requests to ROUTE, one connection each: returns how many got a 200. A request
    counts once its response has ended: the worker records it before it closes the connection."""
    ok = 0
    for _ in range(count):
        # OSError: a worker killed or recycled with this connection queued: never answered.
        with contextlib.suppress(OSError):
            ok += http_request(svc.port, "GET", ROUTE, timeout=10).status == 200
    return ok


@pytest.mark.boot
@pytest.mark.xdist_group(COMBO.id)
def test_totals_exact_across_recycles_and_kills(project: Project, tmp_path: Path) -> None:
    """max_requests recycles a worker after 15 requests, and two workers are SIGKILLed: the
    totals the master serves equal the responses received, never go backwards, and the metric
    files stay as many as the live workers need plus one archive per type."""
    directory = tmp_path / "metrics"
    env = service_env(directory, GUNICORN_CMD_ARGS="--max-requests 15 --max-requests-jitter 0")
    with serve(project, env, tmp_path, bind_via="cli") as svc:
        svc.wait_for_workers(2)
        sent, totals, most_files = 0, [], 0
        for batch in range(12):
            sent += send(svc, 40)
            if batch in (3, 8):
                svc.kill_serving_worker()
            totals.append(route_total(scrape(svc)))
            most_files = max(most_files, len(list(directory.iterdir())))
        svc.wait_for_workers(2, startups=0)
        samples, restarts, booted = settled(svc, floor=3)
        assert route_total(samples) == sent, (sent, totals)
        assert totals == sorted(totals), f"a total went backwards: {totals}"
        # Every worker booted after the first two replaced one that exited. The two kills, and
        # at least one recycle (480 requests, 15 per worker's life). How many more depends on
        # timing (uvicorn checks the limit on its tick, and a replacement boots while the other
        # worker serves everything): 4 to 9 seen, so only the floor is certain.
        assert restarts == booted - 2 >= 3, (restarts, booted)
        # Per live worker: a counter, a histogram and two gauge files; and two archives. A
        # worker starting while another is reaped may briefly make it three sets.
        assert most_files <= 3 * 4 + 2, sorted(p.name for p in directory.iterdir())
        assert samples[("gunicorn_workers", ())] == 2
        # Not on the service's port.
        assert http_request(svc.port, "GET", "/metrics").status == 404


@pytest.mark.boot
@pytest.mark.xdist_group(COMBO.id)
def test_a_reload_restarts_no_worker(project: Project, tmp_path: Path) -> None:
    """A reload (HUP) replaces every worker: the master's doing, no restart (the alert on
    restarts would fire on every `systemctl reload`); a worker killed after it still counts,
    one that TTOU stops does not."""
    with serve(project, service_env(tmp_path / "metrics"), tmp_path) as svc:
        old = svc.wait_for_workers(2)
        os.kill(svc.process.pid, signal.SIGHUP)
        deadline = time.monotonic() + 30
        while svc.worker_pids() & old or len(svc.worker_pids()) != 2:
            assert time.monotonic() < deadline, svc.log_path.read_text()[-4000:]
            time.sleep(0.1)
        svc.wait_for_workers(2, startups=4)
        # The old workers reaped (the master folds each as it reaps it): none counted.
        assert restarts_once(svc, lambda samples: samples[("gunicorn_workers", ())] == 2) == 0
        send(svc, 4)
        svc.kill_serving_worker()
        # Counted as the master reaps it, just after it logs the kill.
        assert restarts_once(svc, lambda samples: restarts_of(samples) >= 1) == 1
        # TTOU: one worker fewer, stopped by the master: no restart either.
        os.kill(svc.process.pid, signal.SIGTTOU)
        assert restarts_once(svc, lambda samples: samples[("gunicorn_workers", ())] == 1) == 1


def restarts_of(samples: Samples) -> float:
    return samples[("gunicorn_worker_restarts_total", ())]


def restarts_once(svc: Service, condition: Callable[[Samples], bool]) -> float:
    """The restarts a scrape counts, once a scrape meets condition (else the last one's)."""
    deadline = time.monotonic() + 15
    while not condition(samples := scrape(svc)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return restarts_of(samples)


@pytest.mark.boot
@pytest.mark.xdist_group(COMBO.id)
def test_a_binary_upgrade_leaves_the_running_masters_counts(
    project: Project, tmp_path: Path
) -> None:
    """USR2 (gunicorn's binary upgrade) starts a second master from the first, with the
    metrics directory the operator named (PROMETHEUS_MULTIPROC_DIR), and it cannot take
    METRICS_BIND from the first: it exits, and the running master counts on, whole (the second
    master emptied the directory, the first's, in use: every count was lost)."""
    with serve(project, service_env(tmp_path / "metrics"), tmp_path) as svc:
        svc.wait_for_workers(2)
        sent = send(svc, 20)
        os.kill(svc.process.pid, signal.SIGUSR2)
        # Its last words (SystemExit's, on stderr: not a JSON line).
        deadline = time.monotonic() + 60
        while "cannot listen there" not in svc.log_path.read_text():
            assert time.monotonic() < deadline, svc.log_path.read_text()[-3000:]
            time.sleep(0.1)
        sent += send(svc, 20)
        assert route_total(scrape(svc)) == sent == 40


@pytest.mark.boot
@pytest.mark.xdist_group(COMBO.id)
def test_a_scan_of_unknown_paths_adds_no_series(project: Project, tmp_path: Path) -> None:
    with serve(project, service_env(tmp_path / "metrics"), tmp_path) as svc:
        # One unknown path per method label: the series a scan could add, added once.
        for method in ("GET", "POST", "PROPFIND"):  # PROPFIND: beyond the usual, "other"
            assert http_request(svc.port, method, "/first-unknown").status in {404, 405}
        time.sleep(0.6)  # the in-flight gauge is written within half a second
        before = set(scrape(svc))
        rng = random.Random(13)
        for _ in range(1000):
            path = "/" + "".join(rng.choices(string.ascii_lowercase + "/-.", k=rng.randint(1, 40)))
            http_request(svc.port, rng.choice(["GET", "POST", "PROPFIND", "PURGE", "LOCK"]), path)
        time.sleep(0.6)
        assert set(scrape(svc)) == before


# --------------------------------------------------------------------------- real Prometheus


def prometheus_query(port: int, query: str) -> list[dict[str, object]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]["result"]  # type: ignore[no-any-return]


@contextlib.contextmanager
def prometheus_server(tmp_path: Path, config: str) -> Iterator[int]:
    """Debian's Prometheus server on a free port with the given configuration: its port."""
    port = free_port()
    (tmp_path / "prometheus.yml").write_text(config)

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    cmd = [
        "prometheus",
        f"--config.file={tmp_path / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    with started(cmd, tmp_path, os.environ, tmp_path / "prometheus.log", ready, timeout=60):
        yield port


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """Debian's Prometheus server on a free port, scraping what `targets` lists every second."""
    targets = tmp_path / "targets.json"
    targets.write_text("[]")
    config = (
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: my-service\n"
        "    file_sd_configs: [{files: ['" + str(targets) + "'], refresh_interval: 1s}]\n"
    )
    with prometheus_server(tmp_path, config) as port:
        yield port, targets


@pytest.mark.drills
@pytest.mark.xdist_group(COMBO.id)
def test_prometheus_reads_exact_totals(
    project: Project, tmp_path: Path, prometheus: tuple[int, Path]
) -> None:
    """A real Prometheus scraping a service of two workers, one SIGKILLed half-way: the total it
    reads back is exactly the number of answered requests."""
    port, targets = prometheus
    with serve(project, service_env(tmp_path / "metrics"), tmp_path) as svc:
        svc.wait_for_workers(2)
        targets.write_text(json.dumps([{"targets": [f"127.0.0.1:{svc.metrics_port}"]}]))
        query = f'sum(http_requests_total{{job="my-service",route="{ROUTE}"}})'
        deadline = time.monotonic() + 30
        while not prometheus_query(port, "up == 1"):
            assert time.monotonic() < deadline, "Prometheus never scraped the service"
            time.sleep(0.2)
        sent = send(svc, 300)
        svc.kill_serving_worker()
        sent += send(svc, 300)
        deadline = time.monotonic() + 20
        seen: list[float] = []
        while True:
            result = prometheus_query(port, query)
            seen.append(float(result[0]["value"][1]) if result else 0.0)  # type: ignore[index]
            if seen[-1] == sent or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert seen[-1] == sent, (sent, seen)
        # Never backwards as Prometheus saw it: no counter reset across the kill.
        resets = prometheus_query(port, f"resets(http_requests_total{{route='{ROUTE}'}}[5m])")
        assert all(float(r["value"][1]) == 0 for r in resets), resets  # type: ignore[index]


@pytest.mark.drills
@pytest.mark.xdist_group(COMBO.id)
def test_the_guides_scrape_config_and_the_rules_meet_the_real_metrics(
    project: Project, tmp_path: Path
) -> None:
    """The scrape configuration deploy/README.md gives (its target set to the service's metrics
    port) with the shipped rules, in a real Prometheus: it scrapes the service; every metric the
    rules read exists under the job they select, with the labels they aggregate by; the
    recording rules have values; and no alert is even pending on the healthy service."""
    guide = (project.path / "deploy" / "README.md").read_text().split("\n## Metrics\n")[1]
    blocks = re.findall(r"```yaml\n(.*?)```", guide.split("\n## ")[0], re.S)
    (config,) = [yaml.safe_load(b) for b in blocks if "scrape_configs" in b]
    (job,) = config["scrape_configs"]
    rules = project.path / "deploy" / "prometheus" / f"{job['job_name']}.rules.yml"
    assert [Path(f).name for f in config["rule_files"]] == [rules.name]
    with serve(project, service_env(tmp_path / "metrics"), tmp_path) as svc:
        svc.wait_for_workers(2)
        # The guide's discovery (Docker's DNS, or a static target) replaced by the service here.
        job.pop("dns_sd_configs", None)
        job["static_configs"] = [{"targets": [f"127.0.0.1:{svc.metrics_port}"]}]
        config["rule_files"] = [str(rules)]
        config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        with prometheus_server(tmp_path, yaml.safe_dump(config)) as port:
            deadline = time.monotonic() + 30
            while not prometheus_query(port, f'up{{job="{job["job_name"]}"}} == 1'):
                assert time.monotonic() < deadline, "Prometheus never scraped the service"
                time.sleep(0.2)
            assert svc.get("/health/ready").status == 200  # service_ready: made by an answer
            sent = send(svc, 20)
            # Every metric the rules read, with the labels they use.
            text = rules.read_text()
            wanted = {
                "http_requests_total": {"route", "method", "status"},
                "http_request_duration_seconds_bucket": {"route", "le"},
                "service_ready": set(),
                "gunicorn_worker_restarts_total": set(),
                "gunicorn_workers": set(),
                "gunicorn_workers_wanted": set(),
            }
            assert set(re.findall(r"([a-z_]+)\{job=", text)) == set(wanted)
            records = re.findall(r"record: (\S+)", text)
            total = f'sum(http_requests_total{{route="{ROUTE}", status="200"}})'
            deadline = time.monotonic() + 30
            while True:
                missing = [
                    name
                    for name, labels in wanted.items()
                    if not any(
                        labels <= set(series["metric"])
                        for series in prometheus_query(port, f'{name}{{job="{job["job_name"]}"}}')
                    )
                ]
                # The error ratio has no value without a 5xx: the service gave none.
                empty = [r for r in records if "5xx" not in r and not prometheus_query(port, r)]
                served = [float(r["value"][1]) for r in prometheus_query(port, total)]  # type: ignore[index]
                if (not (missing or empty) and served == [sent]) or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            assert not missing and not empty and served == [sent], (missing, empty, served, sent)
            assert prometheus_query(port, "ALERTS") == []
