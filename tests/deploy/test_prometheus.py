"""The Prometheus rules (deploy/prometheus/): `promtool check rules` accepts them and
`promtool test rules` passes the unit tests the project ships with them; a copy with a broken
threshold fails those tests."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from ..helpers import COMBOS, Combo
from .support import Generated, check, params, tool

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
        ("/ 10000 + 3", "/ 100 + 3"),  # restarts blamed on max_requests
        ('service_ready{job="my-service"}) == 0', 'service_ready{job="other"}) == 0'),
        # Each alert on a healthy service: it would fire there.
        ('gunicorn_workers{job="my-service"} <', 'gunicorn_workers{job="my-service"} <='),
        # The instance without requests left out of the comparison: no alert there.
        ('or on (job, instance) 0 * gunicorn_worker_restarts_total{job="my-service"}', ""),
    ],
    ids=[
        "error-threshold",
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
