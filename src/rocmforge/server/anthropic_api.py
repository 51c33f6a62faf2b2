"""Anthropic's Messages API: ``POST /v1/messages``, ``POST /v1/messages/count_tokens``, and the
Anthropic shape of ``GET /v1/models`` (:func:`model_list`, served there when the request
carries the ``anthropic-version`` header that Anthropic's SDK always sends).

In: :mod:`~rocmforge.server.anthropic_protocol` bodies; the conversation goes through the
chat path (:func:`~rocmforge.server.prompts.encode_chat`, the forced-call grammar) into one
engine request. Out: a ``message`` object, or its server-sent events (``message_start``,
``ping``, ``content_block_start`` / ``_delta`` / ``_stop`` per block, ``message_delta``,
``message_stop``; a failure mid-stream is an ``error`` event). Content blocks come in this
order: ``thinking`` (the reasoning block, when the server splits one out), text, then
``tool_use`` blocks, read out of the output by the chat-output layer every chat API shares
(:mod:`~rocmforge.server.chat_output`); streamed, a tool's input comes in
``input_json_delta`` pieces as the model writes it. Errors on ``/v1/messages*``
have Anthropic's shape (``{"type": "error", "error": {"type", "message"}}``), registered with
:mod:`~rocmforge.server.error_shapes` so the middleware's 401 and 413 have it too.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timezone
from http import HTTPStatus
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from rocmforge.engine.request_stream import RequestStream
from rocmforge.errors import InvalidGrammarError, ModelNotFoundError, RocmForgeError
from rocmforge.server import error_shapes
from rocmforge.server.anthropic_protocol import Conversation, CountTokensRequest, MessagesRequest
from rocmforge.server.chat_output import ChatOutput, ParsedReply, ReplyDelta, chat_output, json_reply, tool_sampling
from rocmforge.server.error_shapes import ErrorInfo
from rocmforge.server.errors import request_id_of
from rocmforge.server.prompts import encode_chat
from rocmforge.server.state import ServerState
from rocmforge.server.streams import merged, results_or_disconnect, sse, submit

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


def _content(reply: ParsedReply, parallel: bool) -> list[dict[str, Any]]:
    """A whole reply's blocks: thinking, text (left out when empty), tool uses (without
    ``parallel``, the first only)."""
    blocks: list[dict[str, Any]] = []
    if reply.reasoning is not None:
        blocks.append({"type": "thinking", "thinking": reply.reasoning, "signature": ""})
    if reply.content:
        blocks.append({"type": "text", "text": reply.content})
    calls = reply.calls if parallel else reply.calls[:1]
    blocks += [{"type": "tool_use", "id": call.id, "name": call.name, "input": json.loads(call.arguments)}
               for call in calls]
    return blocks


def _stop(finish_reason: str | None, stop_reason: str | int | None, called: bool) -> tuple[str, str | None]:
    """Anthropic's ``(stop_reason, stop_sequence)``: a cancelled request reads as ``end_turn``."""
    if called:
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
    grammar, kept = tool_sampling(state, body.forced_tools(), parallel=body.parallel_tool_use,
                                  calls_tools=body.calls_tools)
    params = body.to_sampling_params(tool_grammar=grammar, keep_special_token_ids=kept)
    output = chat_output(state, prompt, body.calls_tools, json_only=json_reply(params, grammar is not None))
    request_id = request_id_of(request) or uuid.uuid4().hex
    try:
        stream = await submit(state, prompt, params, request_id)
    except InvalidGrammarError as exc:  # the forced-call grammar or output_config.format: say which
        if body.forced_tools() is not None:
            raise InvalidGrammarError(f"the tools' input schemas do not compile: {exc.message}", param="tools") from None
        raise InvalidGrammarError(exc.message, param="output_config.format.schema") from None
    message_id = f"msg_{request_id}"
    if body.stream:
        return StreamingResponse(_events(state, stream, message_id, len(prompt), output, body.parallel_tool_use),
                                 media_type="text/event-stream", headers=SSE_HEADERS)
    results = await results_or_disconnect(request, [stream])
    if results is None:
        return JSONResponse({}, status_code=499)
    [result] = results
    reply = output.parse(result.text)
    usage = _usage(len(result.prompt_token_ids), result.num_cached_tokens, len(result.token_ids))
    return _message(message_id, state.model_name, _content(reply, body.parallel_tool_use),
                    _stop(result.finish_reason, result.stop_reason, bool(reply.calls)), usage)


def _event(kind: str, **data: Any) -> str:
    return sse({"type": kind, **data}, event=kind)


def _error_event(status: int, message: str) -> str:
    return _event("error", error={"type": error_type(status), "message": message})


class _Blocks:
    """Anthropic's content blocks of a streamed reply, opened and closed as the pieces come:
    a block ends when a piece of another kind (or another tool call) begins."""

    def __init__(self, parallel: bool) -> None:
        self._parallel = parallel
        self._index = -1
        self._open: str | int | None = None
        """The open block: ``thinking``, ``text``, or a tool call's index."""

    def events(self, piece: ReplyDelta) -> Iterator[str]:
        if piece.reasoning:
            yield from self._switch("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            yield _event("content_block_delta", index=self._index,
                         delta={"type": "thinking_delta", "thinking": piece.reasoning})
        if piece.content:
            yield from self._switch("text", {"type": "text", "text": ""})
            yield _event("content_block_delta", index=self._index, delta={"type": "text_delta", "text": piece.content})
        for delta in piece.tool_calls:
            if delta["index"] > 0 and not self._parallel:
                continue
            if "id" in delta:
                yield from self._switch(delta["index"], {"type": "tool_use", "id": delta["id"],
                                                         "name": delta["function"]["name"], "input": {}})
            arguments = delta["function"].get("arguments")
            if arguments and self._open == delta["index"]:
                yield _event("content_block_delta", index=self._index,
                             delta={"type": "input_json_delta", "partial_json": arguments})

    def close(self) -> Iterator[str]:
        if self._open is not None:
            yield _event("content_block_stop", index=self._index)
            self._open = None

    def _switch(self, block: str | int, start: dict[str, Any]) -> Iterator[str]:
        if self._open == block:
            return
        yield from self.close()
        self._index += 1
        self._open = block
        yield _event("content_block_start", index=self._index, content_block=start)


async def _events(state: ServerState, stream: RequestStream, message_id: str, prompt_tokens: int,
                  output: ChatOutput, parallel: bool) -> AsyncIterator[str]:
    """The reply as Anthropic's stream: thinking, text and tool-use blocks as their pieces come.
    ``message_start`` waits for the engine's first output, which says how much of the prompt
    the prefix cache served, so its ``usage`` is the final one's."""
    choice = output.stream()
    blocks = _Blocks(parallel)
    started = False
    try:
        async for _, result in merged([stream]):
            if not started:
                started = True
                usage = _usage(prompt_tokens, result.num_cached_tokens, 0)
                yield _event("message_start", message=_message(message_id, state.model_name, [], (None, None), usage))
                yield _event("ping")
            if result.finished and result.finish_reason == "error":
                yield _error_event(500, result.error or "generation failed")
                return
            for event in blocks.events(choice.feed(result.delta_text)):
                yield event
            if not result.finished:
                continue
            rest = choice.finish(result.text)
            for event in blocks.events(rest):
                yield event
            for event in blocks.close():
                yield event
            stop_reason, stop_sequence = _stop(result.finish_reason, result.stop_reason, bool(rest.calls))
            usage = _usage(result.num_prompt_tokens, result.num_cached_tokens, result.num_output_tokens)
            yield _event("message_delta", delta={"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                         usage={key: usage[key] for key in ("input_tokens", "output_tokens",
                                                            "cache_creation_input_tokens", "cache_read_input_tokens")})
            yield _event("message_stop")
    except RocmForgeError as exc:
        yield _error_event(exc.http_status, exc.message)
