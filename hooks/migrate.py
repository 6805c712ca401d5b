"""Migration steps for `_migrations` in copier.yml: what a template release renames that an update
cannot carry over by itself.

Run by Copier in the project's directory during `copier update`, only when the update crosses the
version the `_migrations` entry names. Standard library only (it runs with Copier's interpreter),
idempotent (a second run finds nothing to do), and it prints what it did.

    rename-answer OLD NEW    stage "before": a question was renamed in copier.yml; the answer
                             recorded under OLD in the answers file moves to NEW, so the update
                             renders with the user's answer instead of NEW's default.
    rename-setting OLD NEW   stage "after": a setting was renamed in .env.example; .env (never
                             touched by an update, never committed) gets the same rename, keeping
                             the user's value.

Example entry (copier.yml):

    _migrations:
      - version: v1.1.0
        when: "{{ _stage == 'after' }}"
        command: ["{{ _copier_python }}", "{{ _copier_conf.src_path }}/hooks/migrate.py",
                  "rename-setting", "LOG_FORMAT", "LOG_RENDERER"]
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path


def _read(path: Path) -> str:
    with path.open(encoding="utf-8", newline="") as f:
        return f.read()


def _write(path: Path, text: str) -> None:
    # In place ("r+" then truncate): the file keeps its mode (.env stays 0600).
    with path.open("r+", encoding="utf-8", newline="") as f:
        f.write(text)
        f.truncate()


def rename_key(text: str, pattern: str, old: str, new: str) -> tuple[str, str]:
    """Rename the key `old` to `new` in lines matched by pattern (with a {key} placeholder).

    Returns the new text and what happened: "renamed", "absent" or "exists" (new is already
    there, so nothing changes: the user or an earlier run did it).
    """

    def line_re(key: str) -> re.Pattern[str]:
        return re.compile(pattern.format(key=re.escape(key)), re.MULTILINE)

    if not line_re(old).search(text):
        return text, "absent"
    if line_re(new).search(text):
        return text, "exists"
    return line_re(old).sub(lambda m: m.group("lead") + new + m.group("tail"), text), "renamed"


# A top-level key of the answers file (Copier writes it flat: `key: value`).
ANSWER = r"^(?P<lead>){key}(?P<tail>:(?:[ \t]|$))"
# A dotenv assignment, optionally exported, optionally indented.
SETTING = r"^(?P<lead>[ \t]*(?:export[ \t]+)?){key}(?P<tail>[ \t]*=)"


def rename(path: Path, pattern: str, old: str, new: str, what: str) -> None:
    if not path.is_file():
        print(f"migration: {path} not found, no {what} {old} to rename")
        return
    text, outcome = rename_key(_read(path), pattern, old, new)
    if outcome == "renamed":
        _write(path, text)
        print(f"migration: renamed {what} {old} to {new} in {path}")
    elif outcome == "exists":
        print(f"migration: {path} already has {what} {new}, {old} left as it is")
    else:
        print(f"migration: {path} has no {what} {old}, nothing to rename")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Migration steps run by copier update.")
    sub = parser.add_subparsers(dest="step", required=True)
    answer = sub.add_parser("rename-answer", help="rename a recorded answer (stage: before)")
    answer.add_argument("old")
    answer.add_argument("new")
    answer.add_argument("--answers-file", default=".copier-answers.yml", type=Path)
    setting = sub.add_parser("rename-setting", help="rename a setting in .env (stage: after)")
    setting.add_argument("old")
    setting.add_argument("new")
    setting.add_argument("--file", default=".env", type=Path, help="default: %(default)s")
    args = parser.parse_args(argv)

    identifier = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
    for name in (args.old, args.new):
        if not identifier.match(name):
            parser.error(f"{name!r} is not a valid name")
    if args.step == "rename-answer":
        rename(args.answers_file, ANSWER, args.old, args.new, "answer")
    else:
        rename(args.file, SETTING, args.old, args.new, "setting")
    return 0


if __name__ == "__main__":
    sys.exit(main())
