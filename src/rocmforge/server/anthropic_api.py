"""Anthropic's Messages API: ``POST /v1/messages``, ``POST /v1/messages/count_tokens``, and the
Anthropic shape of ``GET /v1/models`` (:func:`model_list`, served there when the request
carries the ``anthropic-version`` header that Anthropic's SDK always sends).

In: :mod:`~rocmforge.server.anthropic_protocol` bodies; the conversation goes through the
chat path (:func:`~rocmforge.server.prompts.encode_chat`, the forced-call grammar) into one
engine request. Out: a ``message`` object, or its server-sent events (``message_start``,
``ping``, ``content_block_start`` / ``_delta`` / ``_stop`` per block, ``message_delta``,
``message_stop``; a failure mid-stream is an ``error`` event). Content blocks come in this
order: text, then ``tool_use`` blocks (read out of the output by :class:`_ToolUseReader`, the
one user of :mod:`~rocmforge.server.tool_calls`' parsers here). Errors on ``/v1/messages*``
have Anthropic's shape (``{"type": "error", "error": {"type", "message"}}``), registered with
:mod:`~rocmforge.server.error_shapes` so the middleware's 401 and 413 have it too.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timezone
from http import HTTPStatus
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from rocmforge.engine.request_stream import RequestStream
from rocmforge.errors import InvalidGrammarError, ModelNotFoundError, RocmForgeError
from rocmforge.server import error_shapes
from rocmforge.server.anthropic_protocol import Conversation, CountTokensRequest, MessagesRequest
from rocmforge.server.error_shapes import ErrorInfo
from rocmforge.server.errors import request_id_of
from rocmforge.server.prompts import encode_chat
from rocmforge.server.state import ServerState
from rocmforge.server.streams import merged, results_or_disconnect, sse, submit
from rocmforge.server.tool_calls import ToolCallStream

router = APIRouter(prefix="/v1")
PREFIX = "/v1/messages"
VERSION_HEADER = "anthropic-version"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

_ERROR_TYPES: dict[int, str] = {
    HTTPStatus.BAD_REQUEST: "invalid_request_error",
    HTTPStatus.UNAUTHORIZED: "authentication_error",
    HTTPStatus.FORBIDDEN: "permission_error",
    HTTPStatus.NOT_FOUND: "not_found_error",
    HTTPStatus.REQUEST_ENTITY_TOO_LARGE: "request_too_large",
    HTTPStatus.TOO_MANY_REQUESTS: "rate_limit_error",
    HTTPStatus.SERVICE_UNAVAILABLE: "overloaded_error",
    HTTPStatus.GATEWAY_TIMEOUT: "timeout_error",
}
"""Anthropic's error ``type`` per HTTP status; any other 4xx is ``invalid_request_error``,
any other 5xx ``api_error``."""


def error_type(status: int) -> str:
    return _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def _error_shape(info: ErrorInfo) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type(info.status), "message": info.message},
            "request_id": info.request_id}


error_shapes.register(PREFIX, _error_shape)


def _state(request: Request) -> ServerState:
    return request.app.state.rocmforge


def _check_model(state: ServerState, model: str) -> None:
    if model != state.model_name:
        raise ModelNotFoundError(f"model {model!r} is not served here (this server serves {state.model_name!r})",
                                 param="model")


async def _prompt(state: ServerState, body: Conversation) -> list[int]:
    _check_model(state, body.model)
    return await encode_chat(state, body.chat_messages(), body.tool_dicts())


# --- the model list, Anthropic's shape -------------------------------------------------------


def model_list(state: ServerState) -> dict[str, Any]:
    """``GET /v1/models`` as Anthropic's SDK reads it (``client.models.list()``): one page."""
    name = state.model_name
    created = datetime.fromtimestamp(int(state.started_at), tz=timezone.utc).isoformat().replace("+00:00", "Z")
    model = {"type": "model", "id": name, "display_name": name, "created_at": created, "lifecycle": "active",
             "max_input_tokens": state.engine.max_model_len, "max_tokens": state.engine.max_model_len}
    return {"data": [model], "has_more": False, "first_id": name, "last_id": name}


# --- /v1/messages/count_tokens ---------------------------------------------------------------


@router.post("/messages/count_tokens")
async def count_tokens(body: CountTokensRequest, request: Request) -> dict[str, Any]:
    """The prompt's token count: system, messages and tools, through the chat template."""
    return {"input_tokens": len(await _prompt(_state(request), body))}


# --- /v1/messages ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ToolUse:
    """One tool call of the reply."""

    id: str
    name: str
    input_json: str
    """The input as JSON text (an object)."""

    def block(self) -> dict[str, Any]:
        return {"type": "tool_use", "id": self.id, "name": self.name, "input": json.loads(self.input_json)}


class _ToolUseReader:
    """Reads the reply's tool calls out of the model's output, passing text before them through
    (holding back what may start a call). The one place this module uses the tool-call parsers
    of :mod:`~rocmforge.server.tool_calls`. Without ``parallel``, only the first call counts."""

    def __init__(self, *, parallel: bool) -> None:
        self._stream = ToolCallStream()
        self._parallel = parallel
        self._sent = 0

    def feed(self, delta: str) -> str:
        """The part of ``delta`` that is surely text (may be empty)."""
        text = self._stream.feed(delta)
        self._sent += len(text)
        return text

    def finish(self, full_text: str) -> tuple[str, list[ToolUse]]:
        """At the end: ``(text not yet passed through, calls)``. A call whose arguments are no
        JSON object is no call (Anthropic's ``input`` is an object): then it is all text."""
        rest, calls = self._stream.finish(full_text)
        if any(not isinstance(json.loads(call.arguments), dict) for call in calls):
            return full_text[self._sent:], []
        uses = [ToolUse(f"toolu_{uuid.uuid4().hex[:24]}", call.name, call.arguments) for call in calls]
        return rest, uses if self._parallel else uses[:1]

    def read(self, text: str) -> tuple[str, list[ToolUse]]:
        """``(text, calls)`` of a whole output (a fresh reader's only call)."""
        head = self.feed(text)
        rest, calls = self.finish(text)
        return head + rest, calls


def _stop(finish_reason: str | None, stop_reason: str | int | None, calls: list[ToolUse]) -> tuple[str, str | None]:
    """Anthropic's ``(stop_reason, stop_sequence)``: a cancelled request reads as ``end_turn``."""
    if calls:
        return "tool_use", None
    if finish_reason == "length":
        return "max_tokens", None
    if isinstance(stop_reason, str):  # a stop string; a stop token id is the end of the turn
        return "stop_sequence", stop_reason
    return "end_turn", None


def _usage(prompt_tokens: int, cached: int, output_tokens: int) -> dict[str, Any]:
    """Anthropic counts the prompt tokens read from the cache apart from ``input_tokens``."""
    return {"input_tokens": prompt_tokens - cached, "output_tokens": output_tokens,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached, "service_tier": "standard"}


def _message(message_id: str, model: str, content: list[dict[str, Any]], stop: tuple[str | None, str | None],
             usage: dict[str, Any]) -> dict[str, Any]:
    return {"id": message_id, "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": stop[0], "stop_sequence": stop[1], "usage": usage}


@router.post("/messages", response_model=None)
async def messages(body: MessagesRequest, request: Request) -> JSONResponse | StreamingResponse | dict[str, Any]:
    state = _state(request)
    prompt = await _prompt(state, body)
    params = body.to_sampling_params()
    request_id = request_id_of(request) or uuid.uuid4().hex
    try:
        stream = await submit(state, prompt, params, request_id)
    except InvalidGrammarError as exc:  # the forced-call grammar or output_config.format: say which
        if body.forced_tools() is not None:
            raise InvalidGrammarError(f"the tools' input schemas do not compile: {exc.message}", param="tools") from None
        raise InvalidGrammarError(exc.message, param="output_config.format.schema") from None
    message_id = f"msg_{request_id}"
    reader = _ToolUseReader(parallel=body.parallel_tool_use) if body.calls_tools else None
    if body.stream:
        return StreamingResponse(_events(state, stream, message_id, len(prompt), reader),
                                 media_type="text/event-stream", headers=SSE_HEADERS)
    results = await results_or_disconnect(request, [stream])
    if results is None:
        return JSONResponse({}, status_code=499)
    [result] = results
    text, calls = reader.read(result.text) if reader is not None else (result.text, [])
    # Thinking blocks, once reasoning output is read, go first in ``content``.
    content = ([{"type": "text", "text": text}] if text else []) + [call.block() for call in calls]
    usage = _usage(len(result.prompt_token_ids), result.num_cached_tokens, len(result.token_ids))
    return _message(message_id, state.model_name, content, _stop(result.finish_reason, result.stop_reason, calls),
                    usage)


def _event(kind: str, **data: Any) -> str:
    return sse({"type": kind, **data}, event=kind)


def _error_event(status: int, message: str) -> str:
    return _event("error", error={"type": error_type(status), "message": message})


async def _events(state: ServerState, stream: RequestStream, message_id: str, prompt_tokens: int,
                  reader: _ToolUseReader | None) -> AsyncIterator[str]:
    """The reply as Anthropic's stream: a text block as soon as there is surely text, the
    ``tool_use`` blocks at the end (each input in one ``input_json_delta``)."""
    yield _event("message_start", message=_message(message_id, state.model_name, [], (None, None),
                                                   _usage(prompt_tokens, 0, 0)))
    yield _event("ping")
    # Thinking blocks, once reasoning output is read, are streamed first, from index 0.
    index = 0
    text_open = False
    try:
        async for _, output in merged([stream]):
            if output.finished and output.finish_reason == "error":
                yield _error_event(500, output.error or "generation failed")
                return
            text = reader.feed(output.delta_text) if reader else output.delta_text
            calls: list[ToolUse] = []
            if output.finished and reader is not None:
                rest, calls = reader.finish(output.text)
                text += rest
            if text:
                if not text_open:
                    yield _event("content_block_start", index=index, content_block={"type": "text", "text": ""})
                    text_open = True
                yield _event("content_block_delta", index=index, delta={"type": "text_delta", "text": text})
            if not output.finished:
                continue
            if text_open:
                yield _event("content_block_stop", index=index)
                index += 1
            for call in calls:
                yield _event("content_block_start", index=index,
                             content_block={"type": "tool_use", "id": call.id, "name": call.name, "input": {}})
                yield _event("content_block_delta", index=index,
                             delta={"type": "input_json_delta", "partial_json": call.input_json})
                yield _event("content_block_stop", index=index)
                index += 1
            stop_reason, stop_sequence = _stop(output.finish_reason, output.stop_reason, calls)
            usage = _usage(output.num_prompt_tokens, output.num_cached_tokens, output.num_output_tokens)
            yield _event("message_delta", delta={"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                         usage={key: usage[key] for key in ("input_tokens", "output_tokens",
                                                            "cache_creation_input_tokens", "cache_read_input_tokens")})
            yield _event("message_stop")
    except RocmForgeError as exc:
        yield _error_event(exc.http_status, exc.message)
