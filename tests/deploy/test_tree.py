"""The tree: each artifact exists exactly for its deployment and follows the answers."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from ..helpers import COMBOS, Combo
from .support import Generated, params

pytestmark = pytest.mark.deploy


FEATURE_WORDS = {
    "postgres": ("postgres", "alembic", "migrat", "database"),
    "redis": ("redis",),
    "sentry": ("sentry",),
}
DEPLOYMENT_WORDS = {
    "docker": ("systemd", "systemctl", "journalctl", "kubectl", "ingress"),
    "systemd": ("docker", "compose", "kubectl", "ingress"),
    "kubernetes": ("systemd", "systemctl", "journalctl", "compose", "certbot"),
}


def artifacts(project: Generated) -> list[Path]:
    names = ("Dockerfile", ".dockerignore", "compose.yaml", "compose.build.yaml")
    paths = [project.path / p for p in names]
    paths += sorted((project.path / "deploy").rglob("*")) + sorted(
        (project.path / ".github").rglob("*")
    )
    return [p for p in paths if p.is_file()]


@pytest.mark.parametrize("combo", params(COMBOS))
def test_artifacts_follow_the_answers(
    generated: Callable[[Combo], Generated], combo: Combo
) -> None:
    """Each artifact exists exactly for its deployment, names the answers, and mentions no
    disabled feature and no other deployment; no Jinja is left over."""
    project = generated(combo)
    docker, systemd = combo.deployment == "docker", combo.deployment == "systemd"
    kubernetes = combo.deployment == "kubernetes"
    for name in ("Dockerfile", ".dockerignore"):
        assert (project.path / name).exists() == (docker or kubernetes), name
    assert (project.path / "compose.yaml").exists() == docker
    assert (project.path / "compose.build.yaml").exists() == docker
    rollout = project.path / "deploy" / "rollout.sh"
    assert rollout.exists() == docker
    assert not docker or os.access(rollout, os.X_OK), "deploy/rollout.sh is executable"
    assert (project.path / "deploy" / "systemd").exists() == systemd
    assert project.unit.exists() == systemd
    assert project.nginx_conf.exists() == (not kubernetes)
    assert (project.path / "deploy" / "kubernetes" / "kustomization.yaml").exists() == kubernetes
    for always in (
        project.path / "deploy" / "README.md",
        project.path / ".github" / "workflows" / "ci.yml",
        project.path / ".github" / "dependabot.yml",
    ):
        assert always.is_file(), always

    for path in artifacts(project):
        text = path.read_text()
        lower = text.lower()
        # GitHub's ${{ }}, metadata-action's {{is_default_branch}} and the Go templates of
        # rollout.sh's `docker inspect --format` ({{.Field}}: no space inside the braces, where
        # the template's own expressions have one) are not Jinja.
        leftover = re.sub(
            r"\$\{\{.*?\}\}|\{\{is_default_branch\}\}|\{\{(?! )[^{}\n]*(?<! )\}\}", "", text
        )
        assert not re.search(r"\{\{|\}\}|\{%|%\}|\{#|#\}", leftover), f"Jinja left in {path}"
        for feature, words in FEATURE_WORDS.items():
            if not getattr(combo, feature):
                found = [w for w in words if w in lower]
                assert not found, f"{path} mentions {found} without {feature}"
        found = [w for w in DEPLOYMENT_WORDS[combo.deployment] if w in lower]
        assert not found, f"{path} mentions {found} in a {combo.deployment} deployment"

    if not kubernetes:
        conf = project.nginx_conf.read_text()
        assert f"server_name {project.domain};" in conf
        assert f"/etc/letsencrypt/live/{project.domain}/fullchain.pem" in conf
    if docker or kubernetes:
        dockerfile = project.read("Dockerfile")
        # The build stages' common start and the runtime stage.
        assert dockerfile.count(f"FROM python:{combo.python_version}-slim AS") == 2
    if docker:
        assert f"name: {project.slug}" in project.read("compose.yaml")
