"""The Prometheus rules (deploy/prometheus/): `promtool check rules` accepts them and
`promtool test rules` passes the unit tests the project ships with them; a copy with a broken
threshold fails those tests. The docker guide's scrape configuration: accepted by Prometheus,
each app container a target of its own."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from ..helpers import COMBOS, Combo
from .support import DOCKER, KUBERNETES, Generated, check, params, tool

pytestmark = pytest.mark.deploy


def rules_dir(project: Generated) -> Path:
    return project.path / "deploy" / "prometheus"


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("combo", params(COMBOS))
def test_rules_check_and_pass_their_tests(
    generated: Callable[[Combo], Generated], combo: Combo
) -> None:
    project = generated(combo)
    directory = rules_dir(project)
    assert sorted(p.name for p in directory.iterdir()) == [
        f"{project.slug}.rules.test.yml",
        f"{project.slug}.rules.yml",
    ]
    checked = promtool("check", "rules", f"{project.slug}.rules.yml", cwd=directory)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 12 rules found" in checked.stdout, checked.stdout
    check(
        [tool("promtool"), "test", "rules", f"{project.slug}.rules.test.yml"],
        directory,
        quiet=False,
    )


@pytest.mark.parametrize("combo", params(COMBOS[:1]))
@pytest.mark.parametrize(
    ("original", "broken"),
    [
        ("ratio_rate5m > 0.05", "ratio_rate5m > 0.5"),  # the error alert never fires
        # The probes counted: they dilute the error ratio below the threshold.
        ('{job="my-service", route!~"/health/.*"}', '{job="my-service"}'),
        ("/ 10000 + 3", "/ 100 + 3"),  # restarts blamed on max_requests
        ('service_ready{job="my-service"}) == 0', 'service_ready{job="other"}) == 0'),
        # Each alert on a healthy service: it would fire there.
        ('gunicorn_workers{job="my-service"} <', 'gunicorn_workers{job="my-service"} <='),
        # The instance without requests left out of the comparison: no alert there.
        ('or on (job, instance) 0 * gunicorn_worker_restarts_total{job="my-service"}', ""),
    ],
    ids=[
        "error-threshold",
        "probes-counted",
        "restart-allowance",
        "readiness-job",
        "workers-missing-when-all-there",
        "restarts-unseen-without-requests",
    ],
)
def test_a_broken_rule_fails_its_tests(
    generated: Callable[[Combo], Generated],
    combo: Combo,
    tmp_path: Path,
    original: str,
    broken: str,
) -> None:
    project = generated(combo).copy(tmp_path / "project")
    rules = rules_dir(project) / f"{project.slug}.rules.yml"
    text = rules.read_text()
    assert original in text
    rules.write_text(text.replace(original, broken))
    assert promtool("check", "rules", rules.name, cwd=rules.parent).returncode == 0
    tested = promtool("test", "rules", f"{project.slug}.rules.test.yml", cwd=rules.parent)
    assert tested.returncode != 0 and "FAILED" in tested.stdout + tested.stderr, tested.stdout


def metrics_section(project: Generated) -> str:
    guide = (project.path / "deploy" / "README.md").read_text()
    return guide.split("\n## Metrics\n")[1].split("\n## ")[0]


@pytest.mark.parametrize("combo", params(DOCKER))
def test_the_docker_guides_prometheus_scrapes_each_app_container(
    generated: Callable[[Combo], Generated], combo: Combo, tmp_path: Path
) -> None:
    """deploy/rollout.sh runs the new app container beside the old one: a static `app:8001`
    target then reaches either, at random (Docker's DNS shuffles the two addresses, and the
    metrics endpoint closes each connection, so every scrape resolves the name again), under one
    instance: counters flip between the two and read as resets. Each container must be a target
    of its own, found in Docker's DNS; Prometheus accepts the configuration and its rules."""
    project = generated(combo)
    blocks = re.findall(r"```yaml\n(.*?)```", metrics_section(project), re.S)
    (config,) = [c for c in map(yaml.safe_load, blocks) if "scrape_configs" in c]
    compose = yaml.safe_load((project.path / "compose.yaml").read_text())
    port = int(compose["services"]["app"]["environment"]["METRICS_BIND"].rsplit(":", 1)[1])
    (job,) = config["scrape_configs"]
    assert job["job_name"] == project.slug  # the job the rules select
    assert "static_configs" not in job, job
    assert job["dns_sd_configs"] == [{"names": ["app"], "type": "A", "port": port}]
    config["rule_files"] = [str(rules_dir(project) / Path(f).name) for f in config["rule_files"]]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    checked = promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.parametrize("combo", params(KUBERNETES[:1]))
def test_the_kubernetes_guides_prometheus_scrapes_each_pod_as_the_rules_expect(
    generated: Callable[[Combo], Generated], combo: Combo
) -> None:
    """The rules select the job named after the project: a generic annotation-driven job would
    name the series after itself and no rule would ever match. The guide's job keeps the
    project's pods, on the port the Deployment names `metrics` (METRICS_BIND's). Checked by its
    structure: Debian's Prometheus is built without Kubernetes discovery, and its promtool
    refuses `kubernetes_sd_configs` as an unknown field."""
    project = generated(combo)
    blocks = re.findall(r"```yaml\n(.*?)```", metrics_section(project), re.S)
    (config,) = [c for c in map(yaml.safe_load, blocks) if "scrape_configs" in c]
    (job,) = config["scrape_configs"]
    assert job["job_name"] == project.slug
    manifests = project.path / "deploy" / "kubernetes"
    deployment = yaml.safe_load((manifests / "deployment.yaml").read_text())
    pod = deployment["spec"]["template"]
    assert job["kubernetes_sd_configs"] == [
        {"role": "pod", "namespaces": {"names": [deployment["metadata"]["namespace"]]}}
    ]
    ports = {p["name"]: p["containerPort"] for c in pod["spec"]["containers"] for p in c["ports"]}
    configmap = yaml.safe_load((manifests / "configmap.yaml").read_text())
    assert ports["metrics"] == int(configmap["data"]["METRICS_BIND"].rsplit(":", 1)[1])
    kept = {
        rule["source_labels"][0]: rule["regex"]
        for rule in job["relabel_configs"]
        if rule.get("action") == "keep"
    }
    assert kept == {
        "__meta_kubernetes_pod_annotation_prometheus_io_scrape": "true",
        "__meta_kubernetes_pod_container_port_name": "metrics",
    }
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert config["rule_files"] == [f"{project.slug}.rules.yml"]
    assert (rules_dir(project) / f"{project.slug}.rules.yml").is_file()


@pytest.mark.parametrize("combo", params(DOCKER[:1]))
def test_the_docker_guide_never_publishes_the_apps_metrics_port(
    generated: Callable[[Combo], Generated], combo: Combo
) -> None:
    """A host port published under `app` is held by the running container: the one
    deploy/rollout.sh starts beside it cannot take it, does not start, and the deploy fails
    (Docker: "Bind for 10.0.0.5:8001 failed: port is already allocated"). What the guide
    publishes for a Prometheus elsewhere is another service's port."""
    project = generated(combo)
    published = re.findall(r'`ports: \["([^"]+)"\]` under `(\w+)`', metrics_section(project))
    assert published, "the guide says how a Prometheus elsewhere reaches the metrics"
    assert all(service != "app" for _, service in published), published
