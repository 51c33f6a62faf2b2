"""ASGI middleware: request ids, the body-size limit, the API key, and (when tracing is on)
the HTTP server span (:mod:`rocmforge.server.tracing`).

Pure ASGI (no ``BaseHTTPMiddleware``) so streaming responses pass through untouched and a
client disconnect reaches the route.
"""

from __future__ import annotations

import json
import secrets
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

from rocmforge.logs import bind_request
from rocmforge.server.error_shapes import ErrorInfo, error_body

if TYPE_CHECKING:
    from rocmforge.server.tracing import RequestTracer

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

REQUEST_ID_HEADER = b"x-request-id"
MAX_CLIENT_ID_LENGTH = 128
OPEN_PATHS = frozenset({"/health"})


def _error(scope: Scope, status: int, code: str, message: str, request_id: str,
           headers: list[tuple[bytes, bytes]] | None = None) -> Callable[[Send], Awaitable[None]]:
    body = json.dumps(error_body(scope["path"], ErrorInfo(status, code, message, request_id=request_id))).encode()

    async def respond(send: Send) -> None:
        await send({
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                        (REQUEST_ID_HEADER, request_id.encode()), *(headers or [])],
        })
        await send({"type": "http.response.body", "body": body})

    return respond


class RequestContextMiddleware:
    """Gives every request an id (the client's ``X-Request-Id`` when sane), echoes it in the
    response, enforces the body-size limit and checks the API key. With a ``tracer``, also
    wraps each request in an HTTP server span and binds its trace id for the logs (without
    one, tracing costs one ``is None`` check)."""

    def __init__(
        self, app: ASGIApp, *, max_body_bytes: int, api_key: str | None, tracer: RequestTracer | None = None
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.api_key = api_key.encode() if api_key else None
        self.tracer = tracer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        request_id = _client_request_id(headers.get(REQUEST_ID_HEADER)) or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        if self.tracer is None:
            with bind_request(request_id):
                await self._handle(scope, receive, send, headers, request_id)
            return
        with self.tracer.trace(scope, headers, request_id) as http, bind_request(request_id, http.trace_id):
            await self._handle(scope, receive, http.wrap(send), headers, request_id)

    async def _handle(
        self, scope: Scope, receive: Receive, send: Send, headers: dict[bytes, bytes], request_id: str
    ) -> None:
        if self.api_key is not None and scope["path"] not in OPEN_PATHS and not self._authorized(headers):
            await _error(scope, 401, "invalid_api_key", "missing or invalid API key", request_id,
                         [(b"www-authenticate", b"Bearer")])(send)
            return
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            await _error(scope, 413, "payload_too_large", f"request body over {self.max_body_bytes} bytes",
                         request_id)(send)
            return

        received = 0
        too_large = False
        replaced = False

        async def limited_receive() -> Message:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    too_large = True
                    return {"type": "http.disconnect"}
            return message

        async def tagged_send(message: Message) -> None:
            nonlocal replaced
            if replaced:
                return
            if message["type"] == "http.response.start":
                if too_large:  # whatever the app made of the cut-off body, the answer is 413
                    replaced = True
                    await _error(scope, 413, "payload_too_large", f"request body over {self.max_body_bytes} bytes",
                                 request_id)(send)
                    return
                message["headers"] = [*message.get("headers", []), (REQUEST_ID_HEADER, request_id.encode())]
            await send(message)

        await self.app(scope, limited_receive, tagged_send)

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        """``Authorization: Bearer <key>`` (OpenAI's and Ollama's clients) or ``x-api-key:
        <key>`` (Anthropic's): either one holding the key will do."""
        expected = self.api_key or b""
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        # Constant-time comparisons, both always made; the scheme check leaks nothing about the key.
        bearer = secrets.compare_digest(token.strip(), expected) and scheme.lower() == b"bearer"
        header = b"x-api-key" in headers and secrets.compare_digest(headers[b"x-api-key"].strip(), expected)
        return bearer or header


def _client_request_id(value: bytes | None) -> str | None:
    if not value or len(value) > MAX_CLIENT_ID_LENGTH:
        return None
    text = value.decode("ascii", "replace")
    return text if text.isprintable() and " " not in text else None
