"""`python -m bench`: generation speed, the cost of the production features, start and memory, and
(with --suite) the test suite's wall time; writes bench/results.json, bench/RESULTS.md and
bench/results.png. Figures only: nothing here fails on a timing."""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from typing import Any

from . import generation, report, serve, suite
from .common import BENCH, OUT, loadavg, log, machine

RESULTS_JSON = BENCH / "results.json"
RESULTS_MD = BENCH / "RESULTS.md"
CHART = BENCH / "results.png"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--suite",
        action="store_true",
        help="also time the full test suite and each tier (long: the whole suite twice)",
    )
    parser.add_argument(
        "--only",
        choices=["generation", "serve", "suite"],
        action="append",
        help="run only these parts (repeatable); the other parts of the report are kept",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: 1 generation run, 3 rounds of 2 s, 3 starts",
    )
    parser.add_argument(
        "--generation-runs", type=int, default=3, help="copies per combination (default 3)"
    )
    parser.add_argument(
        "--rounds", type=int, default=5, help="interleaved load rounds (default 5, at least 3)"
    )
    parser.add_argument(
        "--duration", type=float, default=3, help="seconds of load per measurement (default 3)"
    )
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    parser.add_argument(
        "--starts", type=int, default=5, help="measured starts per variant (default 5)"
    )
    parser.add_argument(
        "--compare",
        metavar="GIT_REF",
        help="also serve the template as of this ref, side by side (before/after a change)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="record where the generated worker spends its time under load (py-spy)",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite RESULTS.md and the chart from results.json",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.generation_runs, args.rounds, args.duration, args.starts = 1, 3, 2, 3
    parts = set(args.only or ["generation", "serve", *(["suite"] if args.suite else [])])

    previous = json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.exists() else {}
    if args.report_only:
        report.write_markdown(RESULTS_MD, previous, CHART.name)
        report.chart(CHART, previous)
        return 0
    missing = [tool for tool in ("wrk", "taskset") if not shutil.which(tool)]
    if missing and "serve" in parts:
        sys.exit(f"missing: {', '.join(missing)} (apt-get install wrk util-linux)")

    started = time.time()
    scratch = OUT / "run"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    results = {
        **{k: v for k, v in previous.items() if k in ("generation", "serve", "suite")},
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": machine(),
    }
    command = "python -m bench " + shlex.join(sys.argv[1:] if argv is None else argv)

    def measured(part: dict[str, Any], start: tuple[str, float]) -> dict[str, Any]:
        # Each part keeps when and how it was measured: a later run may redo only another part.
        return {**part, "date": start[0], "command": command, "load": [start[1], loadavg()[0]]}

    def now() -> tuple[str, float]:
        return time.strftime("%Y-%m-%d %H:%M %Z"), loadavg()[0]

    if "generation" in parts:
        load = now()
        results["generation"] = measured(
            generation.run(scratch / "generation", args.generation_runs), load
        )
    if "serve" in parts:
        load = now()
        results["serve"] = measured(
            serve.run(
                scratch / "serve",
                rounds=max(args.rounds, 3),
                duration=args.duration,
                connections=args.connections,
                start_runs=args.starts,
                compare=args.compare,
                do_profile=args.profile,
            ),
            load,
        )
    if "suite" in parts:
        load = now()
        results["suite"] = measured(suite.run(), load)
    results["elapsed_s"] = time.time() - started

    RESULTS_JSON.write_text(json.dumps(results, indent=1) + "\n")
    report.write_markdown(RESULTS_MD, results, CHART.name)
    report.chart(CHART, results)
    log(
        f"done in {results['elapsed_s'] / 60:.1f} min: {RESULTS_MD.relative_to(BENCH.parent)}, "
        f"{CHART.relative_to(BENCH.parent)}, {RESULTS_JSON.relative_to(BENCH.parent)}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
