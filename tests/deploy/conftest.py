"""Fixtures of the deploy modules: the renderings, throwaway certificates and the container
engines, shared per session."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from pytest_copier import CopierFixture

from ..containers.engines import Docker, Podman, docker_daemon
from ..helpers import Combo, render, run
from .support import Generated, tool


@pytest.fixture(scope="session")
def generated(
    tmp_path_factory: pytest.TempPathFactory, copier_session: CopierFixture
) -> Callable[[Combo], Generated]:
    """Render each combination once per session (and per xdist worker), for every module:
    a test that modifies a rendering modifies its own copy (Generated.copy)."""
    cache: dict[str, Generated] = {}

    def get(combo: Combo) -> Generated:
        if combo.id not in cache:
            path = render(
                copier_session, tmp_path_factory.mktemp(combo.id) / "project", combo.answers
            )
            answers = yaml.safe_load((path / ".copier-answers.yml").read_text())
            cache[combo.id] = Generated(combo, path, answers)
        return cache[combo.id]

    return get


@pytest.fixture(scope="session")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """A throwaway self-signed certificate per domain: a directory with fullchain.pem and
    privkey.pem, like certbot's live/<domain>/."""
    cache: dict[str, Path] = {}

    def get(domain: str) -> Path:
        if domain not in cache:
            directory = tmp_path_factory.mktemp("cert")
            run(
                [
                    tool("openssl"),
                    "req",
                    "-x509",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:prime256v1",
                    "-nodes",
                    "-days",
                    "2",
                    "-subj",
                    f"/CN={domain}",
                    "-addext",
                    f"subjectAltName=DNS:{domain}",
                    "-keyout",
                    str(directory / "privkey.pem"),
                    "-out",
                    str(directory / "fullchain.pem"),
                ]
            )
            cache[domain] = directory
        return cache[domain]

    return get


@pytest.fixture(scope="session")
def podman() -> Iterator[Podman]:
    """podman with the suite's configuration and image store (the `containers` tier). At the
    end, the layers of this session's builds go (every run builds anew; the stand-ins stay)."""
    engine = Podman.create()
    yield engine
    engine("image", "prune", "--force", check=False, timeout=300)


@pytest.fixture(scope="session")
def docker() -> Iterator[Docker]:
    """A Docker daemon of this session's own, stopped (its containers removed) at the end."""
    with docker_daemon() as daemon:
        yield daemon
