"""CLI flags derived from the config classes: one ``--kebab-name`` option per field.

In: a command function and the config classes whose fields it takes (e.g. every engine part
and :class:`~rocmforge.config.ServerConfig` for ``serve``). Out: the same function, whose
signature typer reads, with one option per field — its type, the field's docstring as help,
``[env: ROCMFORGE_<FIELD>]`` — and whose body receives the flags that were given as one
``config`` dict (field name -> value), ready for :func:`rocmforge.settings.load_settings`.
A flag left out is ``None``: the environment, a ``.env`` file or the default decides.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from rocmforge.config import ConfigField, config_fields

CONFIG_PARAMETER = "config"
"""The keyword argument a decorated command receives the given flags in."""


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def with_config_options(*config_classes: type) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a typer command taking ``config: dict[str, Any]`` with one option per field
    of ``config_classes`` (see the module docstring)."""
    specs = [spec for cls in config_classes for spec in config_fields(cls)]

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(command, eval_str=True)
        own = [p for p in signature.parameters.values() if p.name != CONFIG_PARAMETER]
        clash = {p.name for p in own} & {spec.name for spec in specs}
        if clash:
            raise TypeError(f"{command.__name__} declares config fields itself: {sorted(clash)}")
        names = [spec.name for spec in specs]

        def run(**kwargs: Any) -> Any:
            given = {name: kwargs.pop(name) for name in names}
            return command(**kwargs, config={k: v for k, v in given.items() if v is not None})

        options = [inspect.Parameter(spec.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                     annotation=_option(spec)) for spec in specs]
        run.__name__ = command.__name__
        run.__qualname__ = command.__qualname__
        run.__doc__ = command.__doc__
        run.__module__ = command.__module__
        run.__signature__ = signature.replace(parameters=[*own, *options])  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in [*own, *options]}
        return run

    return decorate


def _option(spec: ConfigField) -> Any:
    """``Annotated[T | None, typer.Option(...)]`` for one field."""
    cli_type = _cli_type(spec.annotation)
    env = f"ROCMFORGE_{spec.name.upper()}"
    default = "unset" if spec.default in (None, ()) else ("true" if spec.default is True else
                                                          "false" if spec.default is False else spec.default)
    help_text = f"{spec.doc} [env: {env}; default: {default}]"
    if cli_type is bool:
        decls = f"{flag_name(spec.name)}/--no-{spec.name.replace('_', '-')}"
        return Annotated[bool | None, typer.Option(decls, help=help_text, show_default=False)]
    return Annotated[cli_type | None, typer.Option(flag_name(spec.name), help=help_text, show_default=False)]


def _cli_type(annotation: Any) -> Any:
    """The type typer parses a field's flag as: the field's type without ``None``; a tuple of
    strings is a repeatable option."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        members = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(members) == 1:
            return _cli_type(members[0])
    if origin is tuple:
        return list[str]
    if origin is Literal or annotation in (int, float, str, bool, Path):
        return annotation
    raise TypeError(f"no CLI flag type for {annotation!r}")
