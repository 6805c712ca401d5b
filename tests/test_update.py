"""`copier update` on generated projects: template releases arrive, user edits never get lost.

Each test snapshots the template's working tree into a temporary git repository tagged v1.0.0,
generates a project from a tag, commits it as a user would, then releases newer tags of the
snapshot and runs `copier update` the way the README tells users to.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from copier import run_copy, run_update

from .helpers import ROOT, free_port, python_for, run, started
from .servers import Redis

pytestmark = pytest.mark.update

TOOLS = Path(sys.executable).parent  # the template's dev environment: pre-commit and its hooks

CONFLICT_MARKER = re.compile(rb"^(<<<<<<<|>>>>>>>)( |$)", re.MULTILINE)


# ---------------------------------------------------------------- helpers


def git(*args: str, cwd: Path) -> str:
    return run(["git", *args], cwd=cwd).stdout


class TemplateRepo:
    """A git snapshot of the template that the test edits and tags like a maintainer."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def file(self, name: str) -> Path:
        """template/<name>, or template/<name>.jinja."""
        for candidate in (self.path / "template" / name, self.path / "template" / f"{name}.jinja"):
            if candidate.exists():
                return candidate
        raise FileNotFoundError(f"template/{name}[.jinja] is not in the template")

    def has(self, name: str) -> bool:
        try:
            self.file(name)
        except FileNotFoundError:
            return False
        return True

    def edit(self, name: str, change: Callable[[str], str]) -> None:
        path = self.file(name)
        before = path.read_text()
        after = change(before)
        assert after != before, f"editing {path} changed nothing"
        path.write_text(after)

    def append(self, name: str, text: str) -> None:
        self.edit(name, lambda s: s + text)

    def add_migrations(self, entries: str) -> None:
        """Add `_migrations` entries (YAML list items, two-space indent) to copier.yml."""
        copier_yml = self.path / "copier.yml"
        text = copier_yml.read_text()
        # An empty list (`_migrations: []`) or a list with entries already (`_migrations:`).
        heading = re.compile(r"^_migrations:(?: \[\])?$", re.MULTILINE)
        assert heading.search(text), "copier.yml: no _migrations"
        text = heading.sub(lambda _: "_migrations:\n" + entries.rstrip("\n"), text, count=1)
        copier_yml.write_text(text)

    def release(self, tag: str) -> None:
        git("add", "-A", cwd=self.path)
        git("commit", "-q", "--allow-empty", "-m", f"release {tag}", cwd=self.path)
        git("tag", tag, cwd=self.path)


@pytest.fixture
def template(tmp_path: Path, copier_template: Path) -> TemplateRepo:
    """pytest-copier's template copy (the working tree, uncommitted changes included) in a
    repository of the test's own, tagged v1.0.0: its copy is tagged 99.99.99, which would be
    the newest release of every update here."""
    path = tmp_path / "template-repo"
    shutil.copytree(copier_template, path, symlinks=True, ignore=shutil.ignore_patterns(".git"))
    git("init", "-q", cwd=path)
    repo = TemplateRepo(path)
    repo.release("v1.0.0")
    return repo


def generate(template: TemplateRepo, dst: Path, ref: str, **answers: Any) -> Path:
    """Generate at a tag and commit everything, as the after-copy message tells the user."""
    run_copy(
        str(template.path),
        str(dst),
        data=answers,
        vcs_ref=ref,
        defaults=True,
        unsafe=True,
        quiet=True,
    )
    git("init", "-q", cwd=dst)
    git("add", "-A", cwd=dst)
    git("commit", "-q", "-m", "Generate from copier-fastapi", cwd=dst)
    return dst


def update(dst: Path, ref: str, **kwargs: Any) -> None:
    """`copier update --trust --defaults --vcs-ref REF`, from the recorded template path."""
    run_update(
        str(dst), vcs_ref=ref, defaults=True, overwrite=True, unsafe=True, quiet=True, **kwargs
    )


def check_update(dst: Path) -> int:
    """`copier check-update --quiet`: 2 when the template has a newer release, else 0."""
    return run([str(TOOLS / "copier"), "check-update", "--quiet"], cwd=dst, check=False).returncode


def commit_all(dst: Path, message: str) -> None:
    git("add", "-A", cwd=dst)
    git("commit", "-q", "-m", message, cwd=dst)


def answers(dst: Path) -> dict[str, Any]:
    return yaml.safe_load((dst / ".copier-answers.yml").read_text())


def project_files(dst: Path) -> list[Path]:
    skip = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache"}
    return [p for p in dst.rglob("*") if p.is_file() and not skip & set(p.relative_to(dst).parts)]


def files_with_conflict_markers(dst: Path) -> list[str]:
    return [
        str(p.relative_to(dst))
        for p in project_files(dst)
        if CONFLICT_MARKER.search(p.read_bytes())
    ]


def rej_files(dst: Path) -> list[str]:
    return [str(p.relative_to(dst)) for p in project_files(dst) if p.name.endswith(".rej")]


def unmerged(dst: Path) -> list[str]:
    return git("diff", "--name-only", "--diff-filter=U", cwd=dst).split()


def pre_commit_config(dst: Path) -> dict[str, Any]:
    return yaml.safe_load((dst / ".pre-commit-config.yaml").read_text())


def run_offline_hooks(dst: Path, tmp: Path) -> subprocess.CompletedProcess[str]:
    """Run the generated config's self-contained local hooks (pygrep, fail) on the staged tree.

    Remote hook repositories need a clone from the network; these need nothing.
    """
    hooks = [
        hook
        for repo in pre_commit_config(dst)["repos"]
        if repo["repo"] == "local"
        for hook in repo["hooks"]
        if hook.get("language") in {"pygrep", "fail"}
    ]
    config = tmp / "offline-hooks.yaml"
    config.write_text(yaml.safe_dump({"repos": [{"repo": "local", "hooks": hooks}]}))
    env = {**os.environ, "PRE_COMMIT_HOME": str(tmp / "pre-commit-home")}
    return run(
        [str(TOOLS / "pre-commit"), "run", "--config", str(config), "--all-files"],
        cwd=dst,
        env=env,
        check=False,
    )


def conflict_marker_hook_catches(dst: Path, tmp: Path, path: str) -> bool:
    """Whether a hook of the generated pre-commit config fails on path's conflict markers."""
    for repo in pre_commit_config(dst)["repos"]:
        for hook in repo["hooks"]:
            if hook["id"] == "check-merge-conflict":
                # Copier writes markers outside a git merge: the hook needs --assume-in-merge.
                args = [*hook.get("args", []), path]
                checked = run([str(TOOLS / "check-merge-conflict"), *args], cwd=dst, check=False)
                if checked.returncode != 0:
                    return True
    offline = run_offline_hooks(dst, tmp)
    return offline.returncode != 0 and path in offline.stdout


def uv() -> str:
    for candidate in (ROOT / ".tools" / "bin" / "uv", Path("/tmp/uvvenv/bin/uv")):
        if candidate.exists():
            return str(candidate)
    found = shutil.which("uv")
    if not found:
        pytest.fail("uv not found: run scripts/test, which installs it into .tools/")
    return found


def project_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"VIRTUAL_ENV", "PYTHONPATH"}}
    env.update(UV_PYTHON_DOWNLOADS="never", **extra)
    return env


def run_project_tests(dst: Path, **env: str) -> None:
    """The generated project's own checks, as its README runs them: uv sync, then pytest."""
    version = answers(dst)["python_version"]
    run([uv(), "sync", "--python", str(python_for(version))], cwd=dst, env=project_env())
    run(
        [uv(), "run", "--no-sync", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=dst,
        env=project_env(**env),
    )


@pytest.fixture
def booted(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """Start a generated service under gunicorn (as `make run` does); yields its base URL."""
    with contextlib.ExitStack() as stack:

        def start(dst: Path, **env: str) -> str:
            port = free_port()
            url = f"http://127.0.0.1:{port}"

            def live() -> bool:
                try:
                    return httpx.get(f"{url}/health/live", timeout=1).status_code == 200
                except httpx.HTTPError:
                    return False

            cmd = [uv(), "run", "--no-sync", "gunicorn", "-c", "gunicorn.conf.py"]
            cmd += ["--bind", f"127.0.0.1:{port}", "--workers", "1"]
            log = tmp_path / f"gunicorn-{port}.log"
            stack.enter_context(started(cmd, dst, project_env(**env), log, live, timeout=60))
            return url

        yield start


# ---------------------------------------------------------------- the tests


def test_update_brings_template_changes_and_keeps_every_user_edit(
    template: TemplateRepo, dst: Path
) -> None:
    generate(template, dst, "v1.0.0")
    pkg = answers(dst)["package_name"]

    # The user's edits, committed: a new route module, a rewritten README paragraph, a deleted
    # optional file; and a changed .env value (git-ignored, so never committed).
    route = dst / "src" / pkg / "orders.py"
    route.write_text('"""Orders routes, written by the team."""\n\nORDERS: list[str] = []\n')
    readme_paragraph = "Our team owns this service; page #orders-oncall when it is down."
    readme = (dst / "README.md").read_text().split("\n\n")
    readme[1] = readme_paragraph  # the paragraph under the title
    (dst / "README.md").write_text("\n\n".join(readme))
    deleted = dst / "tests" / "test_request_context.py"
    assert deleted.exists()
    deleted.unlink()
    env = dst / ".env"
    env.write_text(env.read_text().replace("LOG_LEVEL=info", "LOG_LEVEL=debug"))
    env_before, env_mode = env.read_bytes(), stat.S_IMODE(env.stat().st_mode)
    assert b"LOG_LEVEL=debug" in env_before
    commit_all(dst, "Team edits")
    assert check_update(dst) == 0, "copier check-update saw a release that does not exist yet"

    # The template's v1.1.0 changes other places, including the file the user deleted.
    template.append(".gitignore", "\n# Copier update leftovers\n*.orig\n")
    template.append(".env.example", "\n# Added in v1.1.0\nFEATURE_FLAGS=\n")
    template.append("tests/test_request_context.py", "\n# v1.1.0: a change to a deleted file\n")
    (template.path / "template" / "UPGRADING.md").write_text("# Upgrading\n\nSee CHANGELOG.\n")
    template.append("README.md", "\n## Added in v1.1.0\n\nA template section.\n")
    template.release("v1.1.0")

    assert check_update(dst) == 2, "copier check-update did not see v1.1.0"
    update(dst, "v1.1.0")

    # The template's changes arrived ...
    assert (dst / ".gitignore").read_text().endswith("# Copier update leftovers\n*.orig\n")
    assert "FEATURE_FLAGS=" in (dst / ".env.example").read_text()
    assert (dst / "UPGRADING.md").read_text() == "# Upgrading\n\nSee CHANGELOG.\n"
    assert answers(dst)["_commit"] == "v1.1.0"
    # ... and every user edit is still there.
    assert route.read_text().startswith('"""Orders routes, written by the team."""')
    readme_text = (dst / "README.md").read_text()
    assert readme_paragraph in readme_text and "## Added in v1.1.0" in readme_text
    assert not deleted.exists(), "a file the user deleted came back"
    assert env.read_bytes() == env_before and stat.S_IMODE(env.stat().st_mode) == env_mode
    assert files_with_conflict_markers(dst) == [] and rej_files(dst) == []
    assert unmerged(dst) == []
    commit_all(dst, "Update to v1.1.0")
    assert check_update(dst) == 0

    run_project_tests(dst)


@pytest.mark.parametrize("mode", ["inline", "rej"])
def test_same_lines_changed_on_both_sides_give_a_conflict_never_silent_loss(
    template: TemplateRepo, dst: Path, mode: str, tmp_path: Path
) -> None:
    generate(template, dst, "v1.0.0")
    # .gitignore is copied verbatim: the same line exists in the template and the project.
    line = next(x for x in (dst / ".gitignore").read_text().splitlines() if x.strip())
    ignore = dst / ".gitignore"
    ignore.write_text(ignore.read_text().replace(line, "# USER: our own wording", 1))
    commit_all(dst, "Reword .gitignore")
    template.edit(".gitignore", lambda s: s.replace(line, "# TEMPLATE: new wording", 1))
    template.release("v1.1.0")

    update(dst, "v1.1.0", conflict=mode)

    text = ignore.read_text()
    if mode == "inline":
        assert "<<<<<<< before updating" in text and ">>>>>>> after updating" in text
        assert "# USER: our own wording" in text and "# TEMPLATE: new wording" in text
        assert files_with_conflict_markers(dst) == [".gitignore"]
        assert unmerged(dst) == [".gitignore"], "git must see the conflict as unresolved"
        assert rej_files(dst) == []
    else:
        # The file takes the template's version; the user's hunk that no longer applies is kept
        # beside it, for the user to re-apply by hand.
        assert "# TEMPLATE: new wording" in text and "# USER: our own wording" not in text
        assert files_with_conflict_markers(dst) == []
        assert rej_files(dst) == [".gitignore.rej"]
        assert "+# USER: our own wording" in (dst / ".gitignore.rej").read_text()
        assert ".gitignore.rej" in git("status", "--porcelain", cwd=dst), "git status hides it"

    # Committing the unresolved result (`git add -A && git commit`) is stopped by pre-commit.
    git("add", "-A", cwd=dst)
    if mode == "inline":
        assert conflict_marker_hook_catches(dst, tmp_path, ".gitignore"), (
            "no pre-commit hook fails on Copier's conflict markers (check-merge-conflict needs "
            "args: [--assume-in-merge]: Copier's markers are written outside a git merge)"
        )
    else:
        hooks = run_offline_hooks(dst, tmp_path)
        assert hooks.returncode != 0 and ".gitignore.rej" in hooks.stdout, hooks.stdout


def test_enabling_redis_through_update_adds_everything_redis_needs(
    template: TemplateRepo,
    dst: Path,
    redis: Redis,
    capfd: pytest.CaptureFixture[str],
    booted: Callable[..., str],
) -> None:
    generate(template, dst, "v1.0.0", redis=False)
    pkg = answers(dst)["package_name"]
    cache = dst / "src" / pkg / "cache.py"
    assert not cache.exists()
    assert "REDIS_URL" not in (dst / ".env.example").read_text()
    env_before = (dst / ".env").read_bytes()
    capfd.readouterr()

    update(dst, "v1.0.0", data={"redis": True})

    assert answers(dst)["redis"] is True
    assert cache.exists()
    assert re.search(r'"redis[>=<~]', (dst / "pyproject.toml").read_text()), "no redis dependency"
    assert "redis_url" in (dst / "src" / pkg / "settings.py").read_text()
    assert "redis" in (dst / "src" / pkg / "health.py").read_text()
    assert "REDIS_URL=" in (dst / ".env.example").read_text()
    assert "redis" in yaml.safe_load((dst / "compose.yaml").read_text())["services"]
    ci = yaml.safe_load((dst / ".github" / "workflows" / "ci.yml").read_text())
    assert any("redis" in job.get("services", {}) for job in ci["jobs"].values()), "CI: no redis"
    assert (dst / ".env").read_bytes() == env_before, "an update touched .env"
    said = "".join(capfd.readouterr())
    assert ".env lacks" in said and "REDIS_URL=" in said, "the update did not name REDIS_URL"
    assert files_with_conflict_markers(dst) == [] and rej_files(dst) == []
    commit_all(dst, "Enable Redis")

    run_project_tests(dst, TEST_REDIS_URL=redis.url(db=9))
    url = booted(dst, REDIS_URL=redis.url(db=10), ENVIRONMENT="development")
    ready = httpx.get(f"{url}/health/ready", timeout=10)
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"].get("redis") == "ok", ready.text


def test_switching_deployment_to_kubernetes_and_back(template: TemplateRepo, dst: Path) -> None:
    """docker -> kubernetes -> docker through `copier update --data deployment=...`: each
    deployment's files appear and the other's go, without a conflict; the user's own file stays."""
    generate(template, dst, "v1.0.0", deployment="docker", postgres=True)
    (dst / "NOTES.md").write_text("mine\n")
    commit_all(dst, "A note")
    docker_only = [dst / "compose.yaml", dst / "deploy" / "nginx" / "my-service.conf"]
    kubernetes_only = [
        dst / "deploy" / "kubernetes" / name
        for name in ("kustomization.yaml", "deployment.yaml", "migration-job.yaml")
    ]
    shared = [dst / "Dockerfile", dst / ".dockerignore"]

    update(dst, "v1.0.0", data={"deployment": "kubernetes"})
    assert answers(dst)["deployment"] == "kubernetes"
    assert all(p.is_file() for p in kubernetes_only + shared)
    assert not any(p.exists() for p in docker_only)
    assert "compose.yaml" not in (dst / ".dockerignore").read_text()
    ci = yaml.safe_load((dst / ".github" / "workflows" / "ci.yml").read_text())
    assert "image" in ci["jobs"]
    assert "kubectl" in (dst / "deploy" / "README.md").read_text()
    assert files_with_conflict_markers(dst) == [] and rej_files(dst) == []
    assert (dst / "NOTES.md").read_text() == "mine\n"
    commit_all(dst, "Move to Kubernetes")

    update(dst, "v1.0.0", data={"deployment": "docker"})
    assert answers(dst)["deployment"] == "docker"
    assert all(p.is_file() for p in docker_only + shared)
    assert not (dst / "deploy" / "kubernetes").exists()
    assert "compose.yaml" in (dst / ".dockerignore").read_text()
    assert "kubectl" not in (dst / "deploy" / "README.md").read_text()
    assert files_with_conflict_markers(dst) == [] and rej_files(dst) == []
    assert (dst / "NOTES.md").read_text() == "mine\n"


def test_template_side_leftovers_never_reach_a_project(template: TemplateRepo, dst: Path) -> None:
    """_exclude: caches, editor backups and update leftovers in template/ are not rendered."""
    junk = [
        "__pycache__/mod.cpython-311.pyc",
        ".ruff_cache/CACHEDIR.TAG",
        ".mypy_cache/x.json",
        ".pytest_cache/README.md",
        "~notes.txt",
        "README.md.rej",
        "README.md.orig",
        "src/{{ package_name }}/__pycache__/api.cpython-311.pyc",
    ]
    for name in junk:
        path = template.path / "template" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("junk\n")
    template.release("v1.0.1")
    generate(template, dst, "v1.0.1")
    leaked = [
        str(p.relative_to(dst))
        for p in dst.rglob("*")
        if p.is_file() and ".git" not in p.relative_to(dst).parts and p.read_bytes() == b"junk\n"
    ]
    assert leaked == []


# ---------------------------------------------------------------- migrations

HOOK = '["{{ _copier_python }}", "{{ _copier_conf.src_path }}/hooks/migrate.py"'


def _release_migrations(template: TemplateRepo) -> None:
    """v1.0.0 -> v1.1.0 renames a .env setting, v1.1.0 -> v1.2.0 renames a question.

    The v1.0.0 tag (the snapshot) gets a probe setting and a probe question first, as v1.0.0'.
    """
    template.append(".env.example", "\nPROBE_OLD_SETTING=from-template\n")
    (template.path / "copier.yml").write_text(
        (template.path / "copier.yml").read_text()
        + "\nprobe_greeting:\n  type: str\n  default: hello\n"
    )
    (template.path / "template" / "PROBE.md.jinja").write_text("{{ probe_greeting }}\n")
    git("tag", "-d", "v1.0.0", cwd=template.path)
    template.release("v1.0.0")

    template.edit(".env.example", lambda s: s.replace("PROBE_OLD_SETTING=", "PROBE_NEW_SETTING="))
    template.add_migrations(
        "  - version: v1.1.0\n"
        "    when: \"{{ _stage == 'after' }}\"\n"
        f"    command: {HOOK}, rename-setting, PROBE_OLD_SETTING, PROBE_NEW_SETTING]\n"
    )
    template.release("v1.1.0")

    copier_yml = template.path / "copier.yml"
    copier_yml.write_text(copier_yml.read_text().replace("probe_greeting:", "probe_salutation:"))
    (template.path / "template" / "PROBE.md.jinja").write_text("{{ probe_salutation }}\n")
    template.add_migrations(
        "  - version: v1.2.0\n"
        "    when: \"{{ _stage == 'before' }}\"\n"
        f"    command: {HOOK}, rename-answer, probe_greeting, probe_salutation]\n"
    )
    template.release("v1.2.0")


RENAMED_SETTING = "migration: renamed setting PROBE_OLD_SETTING to PROBE_NEW_SETTING"
RENAMED_ANSWER = "migration: renamed answer probe_greeting to probe_salutation"


def _user_env(dst: Path) -> None:
    env = dst / ".env"
    env.write_text(
        env.read_text().replace("PROBE_OLD_SETTING=from-template", "PROBE_OLD_SETTING=users-value")
    )


def test_migrations_run_exactly_for_the_versions_they_name(
    template: TemplateRepo, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    _release_migrations(template)

    # One release at a time: v1.0.0 -> v1.1.0 runs the v1.1.0 migration only ...
    step = generate(template, tmp_path / "step", "v1.0.0", probe_greeting="bonjour")
    _user_env(step)
    capfd.readouterr()
    update(step, "v1.1.0")
    said = "".join(capfd.readouterr())
    assert said.count(RENAMED_SETTING) == 1 and "probe_salutation" not in said
    assert ".env has every setting of .env.example" in said, "check_env ran before the rename"
    env = (step / ".env").read_text()
    assert "PROBE_NEW_SETTING=users-value" in env and "PROBE_OLD_SETTING" not in env
    assert stat.S_IMODE((step / ".env").stat().st_mode) == 0o600
    assert answers(step)["probe_greeting"] == "bonjour"
    commit_all(step, "Update to v1.1.0")

    # ... and v1.1.0 -> v1.2.0 runs the v1.2.0 one only: the user's answer survives the rename.
    update(step, "v1.2.0")
    said = "".join(capfd.readouterr())
    assert said.count(RENAMED_ANSWER) == 1 and "PROBE_OLD_SETTING" not in said
    recorded = answers(step)
    assert recorded["probe_salutation"] == "bonjour" and "probe_greeting" not in recorded
    assert (step / "PROBE.md").read_text() == "bonjour\n"

    # Across both releases at once, each runs once.
    leap = generate(template, tmp_path / "leap", "v1.0.0", probe_greeting="hola")
    _user_env(leap)
    capfd.readouterr()
    update(leap, "v1.2.0")
    said = "".join(capfd.readouterr())
    assert said.count(RENAMED_SETTING) == 1 and said.count(RENAMED_ANSWER) == 1
    assert "PROBE_NEW_SETTING=users-value" in (leap / ".env").read_text()
    assert (leap / "PROBE.md").read_text() == "hola\n"

    # A project generated at v1.1.0 never runs the v1.1.0 migration, and a copy runs none.
    late = generate(template, tmp_path / "late", "v1.1.0")
    late_env = (late / ".env").read_bytes()
    update(late, "v1.2.0")
    said = "".join(capfd.readouterr())
    assert RENAMED_SETTING not in said and "migration:" in said  # only v1.2.0's step ran
    assert (late / ".env").read_bytes() == late_env
    generate(template, tmp_path / "fresh", "v1.2.0")
    assert "migration:" not in "".join(capfd.readouterr())
