"""Copy-time lifecycle: the answers file, .env with fresh secrets, tasks and messages, the hooks."""

from __future__ import annotations

import importlib.util
import re
import stat
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from pytest_copier import CopierFixture

from .helpers import ROOT, render, run

pytestmark = pytest.mark.generate

PLACEHOLDER = re.compile(r"change-me-[a-z0-9-]+")
ANSWERS = {
    "project_name": "Billing API",
    "project_slug": "billing-api",
    "package_name": "billing",
    "description": "Invoices and payments",
    "author_name": "Payments Team",
    "author_email": "payments@example.org",
    "domain": "billing.example.org",
    "python_version": "3.11",
    "workers": 3,
    "deployment": "docker",
    "postgres": True,
    "redis": True,
    "sentry": True,
}


def _hook(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "hooks" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _questions() -> dict[str, Any]:
    """The questions of copier.yml that are asked (and so recorded), without Copier's internals."""

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!include", lambda loader, node: None)
    merged: dict[str, Any] = {}
    for doc in yaml.load_all((ROOT / "copier.yml").read_text(), Loader=Loader):
        merged.update(doc or {})
    return {
        name: spec
        for name, spec in merged.items()
        if not name.startswith("_") and not (isinstance(spec, dict) and spec.get("when") is False)
    }


def _env(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {k: v for k, v in pairs if not k.startswith("#")}


def test_answers_file_records_every_answer(copier: CopierFixture, tmp_path: Path) -> None:
    dst = render(copier, tmp_path / "p", ANSWERS)
    text = (dst / ".copier-answers.yml").read_text()
    assert text.startswith("# Changes here will be overwritten by Copier")
    recorded = yaml.safe_load(text)
    assert {"_src_path", "_commit"} <= recorded.keys()
    assert recorded["_src_path"] == str(copier.template)
    asked = _questions()
    assert set(ANSWERS) == set(asked), "ANSWERS must name every question: a question was added"
    assert {k: v for k, v in recorded.items() if not k.startswith("_")} == ANSWERS


def _url_password(url: str) -> str:
    match = re.search(r"://[^:/]+:([^@]+)@", url)
    assert match, url
    return match.group(1)


@pytest.mark.parametrize("deployment", ["docker", "systemd", "kubernetes"])
def test_env_gets_fresh_secrets(copier: CopierFixture, tmp_path: Path, deployment: str) -> None:
    answers = {**ANSWERS, "deployment": deployment}
    first = render(copier, tmp_path / "one", answers)
    second = render(copier, tmp_path / "two", answers)
    example, env = (first / ".env.example").read_text(), (first / ".env").read_text()

    assert stat.S_IMODE((first / ".env").stat().st_mode) == 0o600
    assert PLACEHOLDER.search(example), ".env.example has no change-me-* placeholder"
    assert not PLACEHOLDER.search(env), "a placeholder was left in .env"
    # Only the placeholders changed: same lines, same settings, same order.
    assert PLACEHOLDER.sub("X", example).splitlines() == [
        re.sub(r"[A-Za-z0-9]{48}", "X", line) for line in env.splitlines()
    ]
    values = _env(first / ".env")
    secret, password = values["SECRET_KEY"], _url_password(values["DATABASE_URL"])
    assert re.fullmatch(r"[A-Za-z0-9]{48}", secret) and re.fullmatch(r"[A-Za-z0-9]{48}", password)
    assert secret != password
    if deployment == "docker":
        # compose creates the role with POSTGRES_PASSWORD: the same placeholder, the same value.
        assert values["POSTGRES_PASSWORD"] == password
    else:
        assert "POSTGRES_PASSWORD" not in values  # nothing would read it
    # A fresh value for every generation.
    again = _env(second / ".env")
    assert again["SECRET_KEY"] != secret
    assert _url_password(again["DATABASE_URL"]) != password


def test_no_secret_is_committed(copier: CopierFixture, tmp_path: Path) -> None:
    dst = render(copier, tmp_path / "p", ANSWERS)
    secrets = [v for k, v in _env(dst / ".env").items() if k in {"SECRET_KEY", "POSTGRES_PASSWORD"}]
    assert len(secrets) == 2
    run(["git", "init", "-q"], cwd=dst)
    run(["git", "add", "-A"], cwd=dst)
    tracked = run(["git", "ls-files"], cwd=dst).stdout.split()
    assert ".env" not in tracked and ".env.example" in tracked and ".copier-answers.yml" in tracked
    for name in tracked:
        content = (dst / name).read_bytes()
        for secret in secrets:
            assert secret.encode() not in content, f"a generated secret is in {name}"


def test_existing_env_is_never_overwritten(copier: CopierFixture, tmp_path: Path) -> None:
    dst = tmp_path / "p"
    dst.mkdir()
    (dst / ".env").write_text("SECRET_KEY=mine\n")
    render(copier, dst, ANSWERS)
    assert (dst / ".env").read_text() == "SECRET_KEY=mine\n"


def test_copy_tells_what_it_did_and_what_to_do_next(
    copier: CopierFixture, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    with copier.worker(tmp_path / "p", **ANSWERS) as worker:  # not quiet: what a user sees
        worker.run_copy()
    out, err = capfd.readouterr()
    said = out + err
    assert "Created .env from .env.example with 2 fresh random secret(s)" in said
    assert "SECRET_KEY" in said and "POSTGRES_PASSWORD" in said
    for secret in _env(tmp_path / "p" / ".env").values():
        if len(secret) == 48:
            assert secret not in said, "a secret was printed"
    steps = ["cd ", "git init", "make install", "make test", "git add . && git commit", "make run"]
    positions = [said.find(step) for step in steps]
    assert all(p >= 0 for p in positions), f"missing next steps in:\n{said}"
    assert positions == sorted(positions), "next steps out of order"
    assert "uv.lock" in said


# ---------------------------------------------------------------- the hooks as plain functions


def test_create_env_fill_maps_each_placeholder_to_one_value() -> None:
    create_env = _hook("create_env")
    text = "A=change-me-a\nAB=change-me-ab\nURL=x://u:change-me-a@h\nN=change-me-\n"
    filled, values = create_env.fill(text)
    assert set(values) == {"change-me-a", "change-me-ab"}
    assert values["change-me-a"] != values["change-me-ab"]
    assert filled.count(values["change-me-a"]) == 2
    assert "N=change-me-\n" in filled  # not a placeholder: no name


def test_migrate_renames_only_whole_keys(copier: CopierFixture, tmp_path: Path) -> None:
    migrate = _hook("migrate")
    env = tmp_path / ".env"
    env.write_text("OLD=1\nOLD_LONGER=2\nexport OLD = 3\n# OLD=4\n")
    env.chmod(0o600)
    migrate.main(["rename-setting", "OLD", "NEW", "--file", str(env)])
    assert env.read_text() == "NEW=1\nOLD_LONGER=2\nexport NEW = 3\n# OLD=4\n"
    assert stat.S_IMODE(env.stat().st_mode) == 0o600
    migrate.main(["rename-setting", "OLD", "NEW", "--file", str(env)])  # idempotent
    assert env.read_text() == "NEW=1\nOLD_LONGER=2\nexport NEW = 3\n# OLD=4\n"

    answers = tmp_path / "answers.yml"
    answers.write_text("_commit: v1\nold: x\nold_other: y\nlist:\n    - old: z\n")
    migrate.main(["rename-answer", "old", "new", "--answers-file", str(answers)])
    assert answers.read_text() == "_commit: v1\nnew: x\nold_other: y\nlist:\n    - old: z\n"
    # Never clobbers a value already recorded under the new name.
    answers.write_text("old: x\nnew: y\n")
    migrate.main(["rename-answer", "old", "new", "--answers-file", str(answers)])
    assert answers.read_text() == "old: x\nnew: y\n"
