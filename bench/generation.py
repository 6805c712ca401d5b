"""Generation speed: `copier copy` (the CLI, as users run it) per combination, next to Copier's own
start-up (`copier --version`) and to the copy of a one-file template (Copier's floor for a copy).

The template is copied from a clean clone of the repository at HEAD, as users copy a release:
uncommitted changes are not measured (from a dirty working tree, Copier also commits them first).
The clone is made with `--no-local`, so its objects arrive in one pack as from a remote: a local
clone hardlinks every loose object of the working repository, and Copier's own clone of it, then
its clean-up, paid ~80 ms per copy for those files, which no user copying a release pays.

The one-file template keeps its file under `_subdirectory`, as this template does: without it,
Copier walks the template's whole repository, `.git` included, and renders the path of every file
there (~330 Jinja compilations, ~0.1 s) before excluding them, which is not the floor of a copy."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

from tests.helpers import COMBOS, Combo

from .common import COPIER, ROOT, hermetic_env, log, median, spread, timed

MINIMAL_COPIER_YML = """\
_answers_file: .copier-answers.yml
_templates_suffix: .jinja
_subdirectory: template
project_name:
  type: str
  default: My Service
"""


def _minimal_template(path: Path, env: dict[str, str]) -> Path:
    """A one-question, one-file template in a git repository: what any copy costs in Copier."""
    shutil.rmtree(path, ignore_errors=True)
    (path / "template").mkdir(parents=True)
    (path / "copier.yml").write_text(MINIMAL_COPIER_YML)
    (path / "template" / "README.md.jinja").write_text("# {{ project_name }}\n")
    (path / "template" / "{{_copier_conf.answers_file}}.jinja").write_text(
        "{{ _copier_answers|to_nice_yaml }}"
    )
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "minimal"]):
        subprocess.run(cmd, cwd=path, env=env, check=True, capture_output=True)
    return path


def _clone_head(path: Path, env: dict[str, str]) -> tuple[Path, str]:
    shutil.rmtree(path, ignore_errors=True)
    subprocess.run(
        ["git", "clone", "-q", "--no-local", str(ROOT), str(path)],
        env=env,
        check=True,
        capture_output=True,
    )
    sha = subprocess.run(
        ["git", "-C", str(path), "rev-parse", "--short", "HEAD"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return path, sha


def _copy_cmd(src: Path, dst: Path, answers: dict[str, Any] | None) -> list[str]:
    cmd = [str(COPIER), "copy", "--trust", "--defaults", "--quiet", "--vcs-ref", "HEAD"]
    for key, value in (answers or {}).items():
        cmd += ["-d", f"{key}={str(value).lower() if isinstance(value, bool) else value}"]
    return [*cmd, str(src), str(dst)]


def run(scratch: Path, runs: int) -> dict[str, Any]:
    env = hermetic_env(scratch)
    minimal = _minimal_template(scratch / "minimal-template", env)
    template, sha = _clone_head(scratch / "template", env)
    dst = scratch / "generated"
    version_cmd = [str(COPIER), "--version"]

    def copy(src: Path, answers: dict[str, Any] | None) -> tuple[float, float]:
        shutil.rmtree(dst, ignore_errors=True)
        wall, cpu, proc = timed(_copy_cmd(src, dst, answers), env)
        shutil.rmtree(dst, ignore_errors=True)
        if proc.returncode != 0:
            raise RuntimeError(f"copier copy failed ({proc.returncode}):\n{proc.stdout[-3000:]}")
        return wall, cpu

    # Warm-up (discarded): fills the bytecode cache, the page cache and git's object cache.
    timed(version_cmd, env)
    copy(minimal, None)
    copy(template, COMBOS[0].answers)

    version: list[tuple[float, float]] = []
    minimal_runs: list[tuple[float, float]] = []
    per_combo: dict[str, list[tuple[float, float]]] = {c.id: [] for c in COMBOS}
    for r in range(runs):
        # Rotate the order each run, so no combination always follows the same one.
        order: list[Combo] = COMBOS[r * 5 % len(COMBOS) :] + COMBOS[: r * 5 % len(COMBOS)]
        log(
            f"generation run {r + 1}/{runs}: copier --version, a one-file template, "
            f"{len(COMBOS)} combinations"
        )
        for i, combo in enumerate(order):
            if i % 4 == 0:  # start-up and the floor, interleaved with the copies
                wall, cpu, _ = timed(version_cmd, env)
                version.append((wall, cpu))
                # As many floor copies as start-ups: 3 (one per run) once gave +0.03 s over
                # start-up where 20 interleaved rounds give +0.22 to +0.30 s.
                minimal_runs.append(copy(minimal, None))
            per_combo[combo.id].append(copy(template, combo.answers))

    version_wall = median([w for w, _ in version])
    combos = []
    for combo in COMBOS:
        walls = [w for w, _ in per_combo[combo.id]]
        combos.append(
            {
                "id": combo.id,
                "answers": combo.answers,
                "wall_median": median(walls),
                "wall_spread": spread(walls),
                "cpu_median": median([c for _, c in per_combo[combo.id]]),
                "adds": median(walls) - version_wall,
            }
        )
    all_walls = [w for runs_ in per_combo.values() for w, _ in runs_]
    return {
        "template_commit": sha,
        "runs": runs,
        "version": {
            "wall_median": version_wall,
            "wall_spread": spread([w for w, _ in version]),
            "cpu_median": median([c for _, c in version]),
            "samples": len(version),
        },
        "minimal": {
            "wall_median": median([w for w, _ in minimal_runs]),
            "wall_spread": spread([w for w, _ in minimal_runs]),
            "cpu_median": median([c for _, c in minimal_runs]),
        },
        "combos": combos,
        "all_wall_median": median(all_walls),
        "adds_median": median(all_walls) - version_wall,
        "adds_max": max(c["adds"] for c in combos),
        "target_adds": 0.3,
    }
