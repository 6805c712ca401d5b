"""Create the generated project's .env from .env.example, with fresh random secrets.

Run by Copier as a task (see `_tasks` in copier.yml) in the new project's directory, on first
generation only. Standard library only: it runs with the interpreter that runs Copier, so the
user installs nothing for it.

- Every distinct placeholder `change-me-<name>` in .env.example gets its own fresh random value
  (the `secrets` module), and the same value wherever the same placeholder appears (e.g. the
  PostgreSQL password in both POSTGRES_PASSWORD and DATABASE_URL).
- .env is created with mode 0600 and never overwritten: if it exists, nothing happens.
- Only the names of the settings it filled are printed, never the values.

Every copy waits for this process, so it imports little: `random.SystemRandom` (os.urandom, the
generator behind `secrets`, without its hmac and hashlib imports), `os.path` rather than pathlib,
and argparse only when arguments are given (Copier gives none). See bench/RESULTS.md.
"""

from __future__ import annotations

import os
import re
import sys
from random import SystemRandom

# A placeholder: `change-me-` then lowercase words joined by single hyphens, not followed by
# another name character (so `change-me-a` never matches inside `change-me-ab`).
PLACEHOLDER = re.compile(r"change-me-[a-z0-9]+(?:-[a-z0-9]+)*(?![A-Za-z0-9_-])")
# Letters and digits only: URL-safe, and safe unquoted in .env files, shells, YAML and URLs.
ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
SECRET_LENGTH = 48  # about 285 bits
_RANDOM = SystemRandom()  # what secrets.choice uses


def new_secret() -> str:
    return "".join(_RANDOM.choice(ALPHABET) for _ in range(SECRET_LENGTH))


def fill(example: str) -> tuple[str, dict[str, str]]:
    """The .env text for an .env.example text, and the secret for each distinct placeholder."""
    values: dict[str, str] = {}

    def replace(match: re.Match[str]) -> str:
        return values.setdefault(match.group(0), new_secret())

    return PLACEHOLDER.sub(replace, example), values


def filled_settings(text: str, placeholders: dict[str, str]) -> list[str]:
    """Names of the settings (KEY=...) whose line holds a placeholder, in file order."""
    names = []
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        key = key.strip().removeprefix("export ").strip()
        if sep and not key.startswith("#") and PLACEHOLDER.search(value) and key not in names:
            names.append(key)
    return names


def git_ignores_env(directory: str) -> bool:
    """Whether the project's .gitignore names .env (a plain check: no git repository exists yet)."""
    gitignore = os.path.join(directory, ".gitignore")
    if not os.path.isfile(gitignore):
        return False
    with open(gitignore, encoding="utf-8") as f:
        patterns = {line.strip() for line in f.read().splitlines()}
    return bool(patterns & {".env", "/.env", ".env*", "/.env*", "*.env"})


def parse_args(argv: list[str]) -> tuple[str, str]:
    """(example, target): the defaults without arguments, as Copier runs it."""
    if not argv:
        return ".env.example", ".env"
    import argparse  # ~25 ms of imports and set-up that a copy need not wait for

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--example", default=".env.example", help="source (default: %(default)s)")
    parser.add_argument("--target", default=".env", help="file to create (default: %(default)s)")
    args = parser.parse_args(argv)
    return args.example, args.target


def main(argv: list[str] | None = None) -> int:
    example, target = parse_args(sys.argv[1:] if argv is None else argv)

    if os.path.exists(target):
        print(f"{target} already exists: left untouched (no secret generated).")
        return 0
    if not os.path.isfile(example):
        print(f"{example} not found: no {target} created.")
        return 0

    with open(example, encoding="utf-8", newline="") as f:
        text = f.read()
    filled, values = fill(text)

    # O_EXCL: never overwrite a file that appeared meanwhile; 0600: readable by the owner only.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    fd = os.open(target, flags, 0o600)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o600)  # whatever the umask
        os.write(fd, filled.encode("utf-8"))
    finally:
        os.close(fd)

    names = filled_settings(text, values)
    if values:
        print(
            f"Created {target} from {example} with {len(values)} fresh random secret(s), "
            f"in: {', '.join(names) or ', '.join(values)}."
        )
    else:
        print(f"Created {target} from {example} (it has no change-me-* placeholder to fill).")
    print(f"{target} is readable by you only (mode 0600); keep it out of version control.")
    if not git_ignores_env(os.path.dirname(target) or "."):
        print(
            f"WARNING: .gitignore does not list {os.path.basename(target)}: "
            "add it before your first commit."
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
