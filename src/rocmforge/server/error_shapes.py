"""The JSON body of an error answer, per API family.

Every route family answers errors in its clients' shape: the native and OpenAI routes with
``{"error": {"type", "code", "message", "param", "request_id"}}`` (the default), and an API
module that speaks another protocol (Ollama's, Anthropic's) registers its own shape for its
path prefix with :func:`register`. Both the exception handlers (:mod:`rocmforge.server.errors`)
and the middleware's early refusals (401, 413) write bodies through :func:`error_body`, so a
client sees one shape whatever refused it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["ErrorInfo", "ErrorShape", "error_body", "register"]


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """What every error answer says, before it is shaped."""

    status: int
    code: str
    message: str
    type: str = "user"
    param: str | None = None
    request_id: str | None = None


ErrorShape = Callable[[ErrorInfo], dict[str, Any]]


def _default(info: ErrorInfo) -> dict[str, Any]:
    return {"error": {"type": info.type, "code": info.code, "message": info.message, "param": info.param,
                      "request_id": info.request_id}}


_SHAPES: dict[str, ErrorShape] = {}


def register(prefix: str, shape: ErrorShape) -> None:
    """Answer errors on paths under ``prefix`` (e.g. ``/api/``) with ``shape``."""
    _SHAPES[prefix] = shape


def error_body(path: str, info: ErrorInfo) -> dict[str, Any]:
    """The body for an error on ``path``: the shape of the longest registered prefix of it."""
    matches = [prefix for prefix in _SHAPES if path.startswith(prefix)]
    shape = _SHAPES[max(matches, key=len)] if matches else _default
    return shape(info)
