"""The environment variables the code reads are the ones ``.env.example`` and
``docs/DEPLOYMENT.md`` list (both directions), with the same defaults, and no guide names a
variable that does not exist."""

from __future__ import annotations

import re

import pytest
from code_facts import (
    VARIABLE,
    code_variables,
    env_example_defaults,
    prefixed_settings,
    settings_variables,
    source_string_variables,
    tooling_variables,
    unprefixed_settings,
)
from doc_blocks import DOCS_DIR, REPO_ROOT, code_spans, read, section, table_rows

DEPLOYMENT = DOCS_DIR / "DEPLOYMENT.md"


def _deployment_table() -> dict[str, str]:
    """Variable -> the default cell, from the "Every variable" table."""
    rows = table_rows(section(read(DEPLOYMENT), "Every variable"))
    assert rows and rows[0][:2] == ["Variable", "Default"], rows[:1]
    table: dict[str, str] = {}
    for cells in rows[1:]:
        [name] = code_spans(cells[0])
        assert name not in table, f"{name} listed twice"
        table[name] = cells[1]
    return table


def test_the_code_reads_variables() -> None:
    assert len(prefixed_settings()) > 10
    assert "NO_COLOR" in unprefixed_settings()


def test_string_literals_name_only_settings() -> None:
    """settings.py is the one place that reads the environment: a ``ROCMFORGE_*`` name in a
    string anywhere in src/ must be a Settings field."""
    assert source_string_variables() <= prefixed_settings(), source_string_variables() - prefixed_settings()


def test_env_example_lists_exactly_the_variables_the_code_reads() -> None:
    text = (REPO_ROOT / ".env.example").read_text(encoding="utf-8")
    assert set(VARIABLE.findall(text)) == code_variables()


def test_deployment_table_lists_every_variable_and_nothing_else() -> None:
    assert set(_deployment_table()) == settings_variables() | source_string_variables()


def test_deployment_defaults_match_env_example() -> None:
    example = env_example_defaults()
    for name, cell in _deployment_table().items():
        if not name.startswith("ROCMFORGE_"):
            continue
        shown = code_spans(cell)
        documented = shown[0] if shown else ""
        assert cell == "unset" or shown, f"{name}: default cell must be `value` or unset, got {cell!r}"
        assert documented == example[name], f"{name}: DEPLOYMENT.md says {cell!r}, .env.example {example[name]!r}"


@pytest.mark.parametrize("doc", ["USER_GUIDE.md", "CLI_REFERENCE.md", "API.md", "DEPLOYMENT.md", "ARCHITECTURE.md"])
def test_guides_name_only_real_variables(doc: str) -> None:
    mentioned = set(VARIABLE.findall(read(DOCS_DIR / doc)))
    unknown = mentioned - code_variables() - tooling_variables()
    assert not unknown, f"{doc} names variables nothing reads: {sorted(unknown)}"


def test_readme_and_deploy_files_name_only_real_variables() -> None:
    paths = [REPO_ROOT / "README.md", *sorted(p for p in (REPO_ROOT / "deploy").rglob("*") if p.is_file())]
    for path in paths:
        unknown = set(VARIABLE.findall(path.read_text(encoding="utf-8"))) - code_variables() - tooling_variables()
        assert not unknown, f"{path.name} names variables nothing reads: {sorted(unknown)}"


def test_tooling_variables_are_documented() -> None:
    tooling = tooling_variables()
    assert "ROCMFORGE_TORCH_SPEC" in tooling
    deployment = read(DEPLOYMENT)
    for name in tooling:
        assert re.search(rf"`{name}`", deployment), f"{name} (read by scripts/) is not in DEPLOYMENT.md"
