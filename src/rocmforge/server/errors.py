"""One JSON error shape for every route, and the handlers that produce it.

``{"error": {"type", "code", "message", "param", "request_id"}}`` with the HTTP status of the
error: :class:`~rocmforge.errors.RocmForgeError` carries its own; request validation
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

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1


def request_id_of(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    type_: str = "user",
    param: str | None = None,
    request_id: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"type": type_, "code": code, "message": message, "param": param, "request_id": request_id}}
    return JSONResponse(body, status_code=status, headers=headers)


def rocmforge_error_response(exc: RocmForgeError, request_id: str | None) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if isinstance(exc, OverloadedError) else None
    body = exc.to_dict()
    return error_response(
        exc.http_status, body["code"], body["message"], type_=body["type"], param=body["param"],
        request_id=request_id, headers=headers,
    )


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RocmForgeError)
    async def _rocmforge(request: Request, exc: RocmForgeError) -> JSONResponse:
        if exc.http_status >= 500:
            logger.error("request failed: %s", exc, exc_info=exc)
        return rocmforge_error_response(exc, request_id_of(request))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        first: dict[str, Any] = exc.errors()[0] if exc.errors() else {}
        location = [str(part) for part in first.get("loc", ()) if part != "body"]
        if first.get("type") == "json_invalid":
            return error_response(400, "invalid_json", "the request body is not valid JSON",
                                  request_id=request_id_of(request))
        param = ".".join(location) or None
        message = first.get("msg", "invalid request")
        if first.get("type") == "extra_forbidden":
            message = "unknown field"
        return error_response(400, "invalid_request", f"{param}: {message}" if param else message,
                              param=param, request_id=request_id_of(request))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
        return error_response(exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail),
                              request_id=request_id_of(request), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(500, "internal_error", "internal server error", type_="internal",
                              request_id=request_id_of(request))
