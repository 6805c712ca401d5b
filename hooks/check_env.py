"""After `copier update`: name the settings of .env.example that the project's .env lacks.

Run by Copier after every update, as the last `_migrations` entry (it names no version), so
after the versioned steps that rename settings. An update never touches .env (it holds the
project's secrets and is git-ignored), so a setting that a template release or a changed answer
adds (REDIS_URL when redis is enabled, say) has to be added by hand: this says which ones. It only
reads, and says nothing where there is no .env. Standard library only.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ASSIGNMENT = re.compile(
    r"^[ \t]*(?:export[ \t]+)?([A-Za-z_][A-Za-z0-9_]*)[ \t]*=(.*)$", re.MULTILINE
)


def settings(text: str) -> dict[str, str]:
    return {m.group(1): m.group(2).strip() for m in ASSIGNMENT.finditer(text)}


def main() -> int:
    env, example = Path(".env"), Path(".env.example")
    if not (env.is_file() and example.is_file()):
        return 0
    have = settings(env.read_text(encoding="utf-8"))
    wanted = settings(example.read_text(encoding="utf-8"))
    missing = [name for name in wanted if name not in have]
    if not missing:
        print(".env has every setting of .env.example (an update never changes .env).")
        return 0
    print(
        f".env lacks {len(missing)} setting(s) of .env.example: add them by hand "
        "(an update never changes .env):"
    )
    for name in missing:
        print(f"  {name}={wanted[name]}")
    if any("change-me-" in wanted[name] for name in missing):
        print(
            "Replace each change-me-<name> placeholder with a random value, the same value "
            "wherever the same placeholder repeats:\n"
            '  python3 -c "import secrets; print(secrets.token_urlsafe(32))"'
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
