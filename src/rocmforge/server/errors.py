"""The exception handlers that turn every failure into an error answer.

The body has the shape of the route's API family (:mod:`rocmforge.server.error_shapes`; by
default ``{"error": {"type", "code", "message", "param", "request_id"}}``) and the HTTP
status of the error: :class:`~rocmforge.errors.RocmForgeError` carries its own; request validation
failures are 400 ``invalid_request`` naming the offending field; a full queue is 429 with
``Retry-After``; anything unexpected is a 500 ``internal_error`` (logged with its traceback,
never shown to the client).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from rocmforge.errors import OverloadedError, RocmForgeError
from rocmforge.server.error_shapes import ErrorInfo, error_body
from rocmforge.server.streams import SafeJSONResponse

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1


def request_id_of(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


def error_response(
    request: Request,
    status: int,
    code: str,
    message: str,
    *,
    type_: str = "user",
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    info = ErrorInfo(status, code, message, type_, param, request_id_of(request))
    return SafeJSONResponse(error_body(request.url.path, info), status_code=status, headers=headers)


def rocmforge_error_response(request: Request, exc: RocmForgeError) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if isinstance(exc, OverloadedError) else None
    body = exc.to_dict()
    return error_response(
        request, exc.http_status, body["code"], body["message"], type_=body["type"], param=body["param"],
        headers=headers,
    )


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RocmForgeError)
    async def _rocmforge(request: Request, exc: RocmForgeError) -> JSONResponse:
        if exc.http_status >= 500 and exc.is_recoverable():  # e.g. draining: expected, no traceback
            logger.warning("request refused: %s", exc)
        elif exc.http_status >= 500:
            logger.error("request failed: %s", exc, exc_info=exc)
        return rocmforge_error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors: list[dict[str, Any]] = list(exc.errors())
        first: dict[str, Any] = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return error_response(request, 400, "invalid_json", "the request body is not valid JSON")
        chosen, message = _explain(errors)
        param = ".".join(_field_path(chosen)) or None
        return error_response(request, 400, "invalid_request", f"{param}: {message}" if param else message,
                              param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
        return error_response(request, exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail),
                              headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(request, 500, "internal_error", "internal server error", type_="internal")


def _is_union_tag(part: object) -> bool:
    """Pydantic names the member of a union that failed in the error location ("str",
    "list[constrained-int]", "list[TextPart]"); no request field is named like that."""
    return isinstance(part, str) and (
        part in {"str", "int", "float", "bool", "none", "dict", "list"} or "[" in part
        or part.startswith(("constrained-", "function-"))
    )


def _field_path(error: dict[str, Any]) -> list[str]:
    """The offending field as the client spells it: ``messages.0.content``."""
    return [str(part) for part in error.get("loc", ()) if part != "body" and not _is_union_tag(part)]


def _explain(errors: list[dict[str, Any]]) -> tuple[dict[str, Any], str]:
    """The error to report, and its message. A union field (``prompt``: text or token ids)
    fails once per member: prefer a member whose type matched but whose value did not (an
    empty list, a negative id) over the members of the wrong type."""
    if not errors:
        return {}, "invalid request"
    field = _field_path(errors[0])[:1]
    same_field = [e for e in errors if _field_path(e)[:1] == field]
    wrong_type = [e for e in same_field if str(e.get("type", "")).endswith("_type")]
    chosen = next((e for e in same_field if e not in wrong_type), errors[0])
    if chosen.get("type") == "extra_forbidden":
        return chosen, "unknown field"
    if chosen in wrong_type and len(wrong_type) > 1:  # the value matches no member: list them all
        prefix = "Input should be "
        expected = dict.fromkeys(str(e.get("msg", "")).removeprefix(prefix) for e in wrong_type)
        return chosen, prefix + " or ".join(expected)
    return chosen, str(chosen.get("msg", "invalid request")).removeprefix("Value error, ")
