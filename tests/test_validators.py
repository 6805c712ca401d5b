"""Every validated question, tried with bad values: each is refused with its message, and no
destination directory is left behind. Then the good values it must accept."""

from __future__ import annotations

from pathlib import Path

import pytest
from pytest_copier import CopierFixture

from .helpers import render

BAD_ANSWERS = [
    ("project_name", "", "must not be empty"),
    ("project_name", "   ", "must not be empty"),
    ("project_name", "x" * 65, "at most 64 characters"),
    ("project_name", "tab\there", "printable"),
    ("project_name", "caf\u00e9 \u2603", "printable"),
    ("project_slug", "My-Service", "is invalid"),
    ("project_slug", "1service", "is invalid"),
    ("project_slug", "my--service", "is invalid"),
    ("project_slug", "my-service-", "is invalid"),
    ("project_slug", "my_service", "is invalid"),
    ("project_slug", "a" * 41, "at most 40 characters"),
    ("package_name", "1abc", "not a valid Python identifier"),
    ("package_name", "my-service", "not a valid Python identifier"),
    ("package_name", "class", "is a Python keyword"),
    ("package_name", "None", "is a Python keyword"),
    ("package_name", "fastapi", "would shadow"),
    ("package_name", "redis", "would shadow"),
    ("package_name", "logging", "would shadow"),
    ("package_name", "test", "would shadow"),
    ("package_name", "sqlalchemy", "would shadow"),
    ("description", "d" * 201, "at most 200 characters"),
    ("description", "two\nlines", "single line"),
    ("author_name", "", "must not be empty"),
    ("author_name", 'quo"te', "without quotes"),
    ("author_email", "not-an-email", "not a valid e-mail"),
    ("author_email", "a@b", "not a valid e-mail"),
    ("author_email", "a b@example.com", "not a valid e-mail"),
    ("domain", "API.example.com", "lowercase fully qualified"),
    ("domain", "https://api.example.com", "lowercase fully qualified"),
    ("domain", "api.example.com:8443", "lowercase fully qualified"),
    ("domain", "api.example.com/v1", "lowercase fully qualified"),
    ("domain", "*.example.com", "lowercase fully qualified"),
    ("domain", "localhost", "lowercase fully qualified"),
    ("domain", "-api.example.com", "lowercase fully qualified"),
    ("domain", "api .example.com", "lowercase fully qualified"),
    ("domain", ("a" * 64) + ".example.com", "lowercase fully qualified"),
    ("domain", ".".join(["abcdefghi"] * 26), "lowercase fully qualified"),
    ("workers", -1, "between 1 and 64"),
    ("workers", 65, "between 1 and 64"),
    ("python_version", "3.10", "3.10"),
    ("deployment", "nomad", "nomad"),
]


@pytest.mark.generate
@pytest.mark.parametrize(
    ("question", "value", "message"),
    BAD_ANSWERS,
    ids=[f"{q}={str(v)[:20]!r}" for q, v, _ in BAD_ANSWERS],
)
def test_bad_answer_is_refused_and_nothing_is_written(
    copier: CopierFixture, tmp_path: Path, question: str, value: object, message: str
) -> None:
    dst = tmp_path / "project"
    with pytest.raises(ValueError, match=question) as raised:
        render(copier, dst, {question: value})
    assert message in str(raised.value)
    assert not dst.exists()


GOOD_ANSWERS = [
    ("project_name", "Billing API (v2)"),
    ("project_slug", "billing-api-2"),
    ("package_name", "billing_api"),
    ("domain", "api.internal.example.co.uk"),
    ("domain", "x1.io"),
    ("author_email", "team+billing@sub.example.org"),
    ("workers", 64),
    ("workers", 1),
]


@pytest.mark.generate
@pytest.mark.parametrize(
    ("question", "value"), GOOD_ANSWERS, ids=[f"{q}={v}" for q, v in GOOD_ANSWERS]
)
def test_good_answer_is_accepted(
    copier: CopierFixture, tmp_path: Path, question: str, value: object
) -> None:
    dst = render(copier, tmp_path / "project", {question: value})
    assert (dst / "pyproject.toml").is_file()


@pytest.mark.generate
def test_defaults_alone_generate_a_project(copier: CopierFixture, tmp_path: Path) -> None:
    dst = render(copier, tmp_path / "project")
    answers = (dst / ".copier-answers.yml").read_text()
    assert "project_slug: my-service" in answers
    assert "package_name: my_service" in answers
    assert (dst / "src" / "my_service" / "main.py").is_file()


@pytest.mark.generate
def test_slug_and_package_are_derived_from_the_name(copier: CopierFixture, tmp_path: Path) -> None:
    dst = render(copier, tmp_path / "project", {"project_name": "Order  Events_Service"})
    assert (dst / "src" / "order_events_service").is_dir()
    assert 'name = "order-events-service"' in (dst / "pyproject.toml").read_text()
