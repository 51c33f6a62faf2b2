"""What the code says, for the docs tests to compare the guides with: the environment
variables rocmforge reads, the tool-only variables of the set-up scripts, and every error
code the HTTP server can answer with.

Everything is derived from the sources (``Settings.model_fields``, string literals, the AST
of the server package), never from a list kept here.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from functools import cache
from pathlib import Path

from doc_blocks import REPO_ROOT
from pydantic import AliasChoices

SRC = REPO_ROOT / "src" / "rocmforge"
VARIABLE = re.compile(r"\bROCMFORGE_[A-Z0-9_]*[A-Z0-9]\b")


@cache
def prefixed_settings() -> frozenset[str]:
    """``ROCMFORGE_<FIELD>`` of every :class:`Settings` field read under the prefix."""
    from rocmforge.settings import Settings

    prefix = Settings.model_config["env_prefix"]
    return frozenset(f"{prefix}{name.upper()}" for name, field in Settings.model_fields.items()
                     if field.validation_alias is None)


@cache
def unprefixed_settings() -> frozenset[str]:
    """Standard variables read through aliases (``NO_COLOR``, ``OTEL_EXPORTER_OTLP_*``)."""
    from rocmforge.settings import Settings

    names: set[str] = set()
    for field in Settings.model_fields.values():
        alias = field.validation_alias
        choices = alias.choices if isinstance(alias, AliasChoices) else [alias] if isinstance(alias, str) else []
        names.update(str(choice) for choice in choices if str(choice).isupper())
    return frozenset(names)


@cache
def source_string_variables() -> frozenset[str]:
    """``ROCMFORGE_*`` names in the string literals (docstrings and messages included) of src/."""
    found: set[str] = set()
    for path in sorted(SRC.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type == tokenize.STRING or tokenize.tok_name[token.type] == "FSTRING_MIDDLE":
                found.update(VARIABLE.findall(token.string))
    return frozenset(found)


@cache
def code_variables() -> frozenset[str]:
    """Every ``ROCMFORGE_*`` variable the package reads or names."""
    return prefixed_settings() | source_string_variables()


@cache
def settings_variables() -> frozenset[str]:
    """Every environment variable :class:`Settings` reads, prefixed or standard."""
    return prefixed_settings() | unprefixed_settings()


@cache
def tooling_variables() -> frozenset[str]:
    """``ROCMFORGE_*`` variables of the set-up tooling (scripts/, Makefile), not of the package."""
    files = [*sorted((REPO_ROOT / "scripts").glob("*")), REPO_ROOT / "Makefile"]
    found: set[str] = set()
    for path in files:
        if path.is_file():
            found.update(VARIABLE.findall(path.read_text(encoding="utf-8")))
    return frozenset(found - code_variables())


def env_example_defaults() -> dict[str, str]:
    """``NAME`` -> the value on its ``# NAME=value`` line in .env.example."""
    text = (REPO_ROOT / ".env.example").read_text(encoding="utf-8")
    return dict(re.findall(r"^#\s*([A-Z][A-Z0-9_]*)=(.*)$", text, flags=re.MULTILINE))


def error_class_codes() -> set[str]:
    """The ``code`` of every error class in rocmforge.errors."""
    from rocmforge import errors

    codes: set[str] = set()
    for value in vars(errors).values():
        if isinstance(value, type) and issubclass(value, errors.RocmForgeError) and value.__module__ == errors.__name__:
            codes.add(value.code)
    return codes


def server_codes() -> set[str]:
    """Codes the server package writes itself: ``"code": "..."`` dict entries, the second
    argument of ``_error`` calls, the third of ``error_response`` calls, and the status -> code table."""
    codes: set[str] = set()
    for path in sorted((SRC / "server").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Dict):
                for key, value in zip(node.keys, node.values, strict=False):
                    if _const(key) == "code" and isinstance(_const(value), str):
                        codes.add(_const(value))
                if node.keys and all(isinstance(_const(k), int) for k in node.keys):
                    codes.update(v for v in map(_const, node.values) if isinstance(v, str))
            elif isinstance(node, ast.Call) and len(node.args) > 2 and _name(node.func) == "error_response":
                if isinstance(_const(node.args[2]), str):  # error_response(request, status, code, ...)
                    codes.add(str(_const(node.args[2])))
            elif isinstance(node, ast.Call) and len(node.args) > 1 and isinstance(_const(node.args[1]), str):
                function, code = _name(node.func), str(_const(node.args[1]))
                if function == "_error":
                    codes.add(code)
                elif function == "get" and re.fullmatch(r"[a-z_]+_error", code):
                    codes.add(code)  # the fallback of codes.get(status, "http_error")
    return codes


def http_error_codes() -> set[str]:
    return error_class_codes() | server_codes()


def _const(node: ast.AST | None) -> object:
    return node.value if isinstance(node, ast.Constant) else None


def _name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def dockerfile_uid(path: Path) -> str | None:
    """The user of the last ``USER`` instruction of a Dockerfile (``uid[:gid]`` -> uid)."""
    users = re.findall(r"^USER\s+(\S+)", path.read_text(encoding="utf-8"), flags=re.MULTILINE)
    return users[-1].split(":")[0] if users else None
