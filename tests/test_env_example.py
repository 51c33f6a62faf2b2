"""``.env.example`` documents exactly the ``ROCMFORGE_*`` variables :class:`Settings` reads,
each with its real default, so the two cannot drift apart."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from rocmforge.settings import Settings

EXAMPLE = Path(__file__).resolve().parent.parent / ".env.example"
ASSIGNMENT = re.compile(r"^#\s*((?:ROCMFORGE_)?[A-Z][A-Z0-9_]*)=(.*)$")


def _documented() -> dict[str, str]:
    """Variable -> the default shown, from the ``# NAME=value`` lines."""
    found: dict[str, str] = {}
    lines = EXAMPLE.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        match = ASSIGNMENT.match(line)
        if match:
            name, value = match.groups()
            assert name not in found, f"{name} documented twice"
            # Each variable comes with a description: the comment line right above it.
            assert i > 0 and lines[i - 1].startswith("# ") and not ASSIGNMENT.match(lines[i - 1]), name
            found[name] = value
    return found


def _prefixed_fields() -> dict[str, str]:
    """``ROCMFORGE_<FIELD>`` -> field name, for the fields read under the prefix (a field with
    its own validation alias, like ``no_color`` / ``NO_COLOR``, is read under that name)."""
    prefix = Settings.model_config["env_prefix"]
    return {f"{prefix}{name.upper()}": name for name, field in Settings.model_fields.items()
            if field.validation_alias is None}


def test_every_prefixed_setting_is_documented_and_nothing_else() -> None:
    documented = {name for name in _documented() if name.startswith("ROCMFORGE_")}
    assert documented == set(_prefixed_fields())


def test_unprefixed_variables_are_documented() -> None:
    assert "NO_COLOR" in _documented()


def test_the_defaults_shown_are_the_real_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("ROCMFORGE_")]:
        monkeypatch.delenv(name)
    defaults = Settings(_env_file=None)
    for variable, value in _documented().items():
        field = _prefixed_fields().get(variable)
        if field is None:
            continue
        expected = getattr(defaults, field)
        if value == "":  # unset
            assert expected in (None, ""), f"{variable}: the example shows no default, the field has {expected!r}"
            continue
        monkeypatch.setenv(variable, value)
        shown = getattr(Settings(_env_file=None), field)
        monkeypatch.delenv(variable)
        if isinstance(shown, Path):
            shown = shown.expanduser()
        assert shown == expected, f"{variable}: the example shows {value!r}, the default is {expected!r}"
