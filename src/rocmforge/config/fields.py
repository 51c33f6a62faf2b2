"""What a config class declares, read once for everyone who derives from it.

In: the config dataclasses of :mod:`rocmforge.config` (fields with their types, defaults and
an attribute docstring each: the string literal right below the field, as vLLM's config
classes write them). Out: one :class:`ConfigField` per field, so the environment settings
(:mod:`rocmforge.settings`), the CLI flags (:mod:`rocmforge.cli.config_options`) and
``LLM(**kwargs)`` are built from the same names, types, defaults and help texts.

Also the validation rules (:data:`Rule`) the config classes declare per field: each raises
:class:`~rocmforge.errors.ConfigError` naming the field (``param``), so whoever built the
object from a flag or a variable can say which one was wrong; the settings run the same
rules, so a bad variable is reported with every other bad one at once.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import textwrap
import typing
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from rocmforge.errors import ConfigError


@dataclass(frozen=True, slots=True)
class ConfigField:
    """One field of a config class, as settings, flags and keyword arguments see it."""

    name: str
    owner: type
    """The config class declaring it."""
    annotation: Any
    """The resolved type (``int``, ``int | None``, ``Literal[...]``, ``tuple[str, ...]``)."""
    default: Any
    doc: str
    """The attribute docstring, whitespace collapsed ("" when the source is unavailable)."""
    rule: Rule | None
    """The class's validation rule for it (``RULES``), if any."""
    secret: bool = False
    """Shown as ``**********`` in settings (an API key)."""


@cache
def config_fields(cls: type) -> tuple[ConfigField, ...]:
    """The user-settable fields of a config dataclass, in declaration order."""
    hints = typing.get_type_hints(cls)
    docs = attribute_docs(cls)
    result = []
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            raise TypeError(f"config field {cls.__name__}.{field.name} needs a default")
        result.append(ConfigField(field.name, cls, hints[field.name], default, docs.get(field.name, ""),
                                  getattr(cls, "RULES", {}).get(field.name),
                                  secret=bool(field.metadata.get("secret"))))
    return tuple(result)


def attribute_docs(cls: type) -> dict[str, str]:
    """Field name -> the string literal right after its declaration in the class body."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source shipped: fields work, help texts are empty
        return {}
    [class_def] = ast.parse(source).body
    docs: dict[str, str] = {}
    body = class_def.body if isinstance(class_def, ast.ClassDef) else []
    for node, following in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


# --- validation rules -------------------------------------------------------------------------

Rule = Callable[[Any, str], Any]
"""Checks one field's value (``rule(value, name)``) and returns it, normalised (a list made a
tuple, a string made a Path); raises :class:`ConfigError` naming the field. A config class
lists its rules in a ``RULES`` class variable; :func:`apply_rules` runs them in
``__post_init__``, the settings run each one as that field's validator."""


def apply_rules(config: Any) -> None:
    """Run ``type(config).RULES`` over a (frozen) config object, storing normalised values."""
    for name, rule in type(config).RULES.items():
        object.__setattr__(config, name, rule(getattr(config, name), name))


def integer(low: int, high: int | None = None) -> Rule:
    def check(value: Any, name: str) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{name} must be an integer, got {value!r}", param=name)
        if value < low or (high is not None and value > high):
            bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise ConfigError(f"{name} must be {bounds}, got {value}", param=name)
        return value

    return check


def power_of_two(low: int, high: int) -> Rule:
    in_range = integer(low, high)

    def check(value: Any, name: str) -> int:
        in_range(value, name)
        if value & (value - 1):
            raise ConfigError(f"{name} must be a power of two, got {value}", param=name)
        return int(value)

    return check


def number(low: float, high: float | None = None, *, low_open: bool = False) -> Rule:
    def check(value: Any, name: str) -> float:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {value!r}", param=name)
        too_low = value <= low if low_open else value < low
        if too_low or (high is not None and value > high):
            interval = f"{'(' if low_open else '['}{low}, " + (f"{high}]" if high is not None else "inf)")
            raise ConfigError(f"{name} must be in {interval}, got {value}", param=name)
        return float(value)

    return check


def boolean(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}", param=name)
    return value


def choice(*choices: str) -> Rule:
    def check(value: Any, name: str) -> str:
        if value not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}", param=name)
        return str(value)

    return check


def non_empty_string(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{name} must be a non-empty string, got {value!r}", param=name)
    return value


def strings(value: Any, name: str) -> tuple[str, ...]:
    """A list or tuple of non-empty strings, as a tuple."""
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ConfigError(f"{name} must be a list of strings, got {value!r}", param=name)
    return tuple(non_empty_string(item, name) for item in value)


def path(value: Any, name: str) -> Path:
    if not isinstance(value, (str, Path)) or not str(value):
        raise ConfigError(f"{name} must be a file path, got {value!r}", param=name)
    return Path(value)


def optional(rule: Rule) -> Rule:
    """``None`` (unset), or what ``rule`` accepts."""

    def check(value: Any, name: str) -> Any:
        return None if value is None else rule(value, name)

    return check
