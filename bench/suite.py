"""Suite timing: the template's full test suite, then each tier (pytest marker), `-n 2` as in CI."""

from __future__ import annotations

import os
import re
from typing import Any

from .common import OUT, ROOT, VENV_BIN, log, timed

TIERS = ["generate", "lint", "project", "boot", "deploy", "update", "drills"]
_SUMMARY = re.compile(
    r"^=*\s*(.*\b(passed|failed|error|errors|skipped|deselected|no tests ran)\b.*?)\s*=*$"
)


def _summary(output: str) -> str:
    for line in reversed(output.splitlines()):
        match = _SUMMARY.match(line.strip())
        if match:
            return match.group(1)
    return output.strip().splitlines()[-1] if output.strip() else ""


def run() -> dict[str, Any]:
    pytest = str(VENV_BIN / "pytest")
    base = [pytest, "-n", "2", "-q", "-p", "no:cacheprovider"]
    results: list[dict[str, Any]] = []
    for name, extra in [("full suite", []), *[(tier, ["-m", tier]) for tier in TIERS]]:
        log(f"suite: {name} ...")
        wall, cpu, proc = timed([*base, *extra], dict(os.environ), cwd=ROOT, timeout=4 * 3600)
        summary = _summary(proc.stdout)
        failed = [
            line.strip()
            for line in proc.stdout.splitlines()
            if line.startswith(("FAILED ", "ERROR "))
        ]
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / f"suite-{name.replace(' ', '-')}.log").write_text(proc.stdout)
        log(f"suite: {name}: {wall:.0f} s, exit {proc.returncode}: {summary}")
        results.append(
            {
                "name": name,
                "marker": extra[1] if extra else None,
                "wall": wall,
                "cpu": cpu,
                "exit": proc.returncode,
                "summary": summary,
                "failed": failed,
            }
        )
    return {"pytest_command": " ".join([*base, "[-m TIER]"]), "runs": results}
