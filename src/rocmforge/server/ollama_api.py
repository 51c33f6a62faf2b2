"""Ollama's API: ``/api/generate``, ``/api/chat``, ``/api/embed`` (and the older
``/api/embeddings``), ``/api/tags``, ``/api/show``, ``/api/ps``, ``/api/version``, and ``GET /``
("Ollama is running"), so Ollama's clients work unchanged.

In: Ollama's JSON bodies (:mod:`rocmforge.server.ollama_protocol`). Out: JSON, or when
``stream`` is true (Ollama's default) NDJSON: one object per line, ``done: false`` with each
text delta, then a ``done: true`` object with the finish reason and the stats (durations in
nanoseconds, from the engine's timestamps of the request). Generation goes the same way as
the OpenAI routes: the chat template (:func:`~rocmforge.server.prompts.encode_chat`), the
engine, and the chat-output layer (the server's reasoning and tool-call parsers), which
:class:`ReplyParser` puts in Ollama's shapes: ``thinking``, ``content``, ``tool_calls``.
``think: false`` reaches the template as ``enable_thinking`` false; ``think`` on a model
without reasoning is a 400, as Ollama has it.

Errors on ``/api/`` are ``{"error": "<message>"}`` with the HTTP status (the shape is
registered for the prefix, so the middleware's 401 and 413 have it too); one that happens
mid-stream is an ``{"error": ...}`` line. ``/api/pull`` of the served model succeeds at once;
pulling anything else, and push, create, copy and delete, are refused (403): the server
serves one model, fixed at start-up.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, NoReturn, TypeVar

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema

from rocmforge import __version__
from rocmforge.engine.request_stream import RequestStream
from rocmforge.errors import (
    ChatTemplateError,
    InvalidGrammarError,
    InvalidRequestError,
    ModelNotFoundError,
    RocmForgeError,
    UnsupportedOperationError,
)
from rocmforge.outputs import TokenLogprobs
from rocmforge.pooling_params import PoolingParams
from rocmforge.sampling_params import SamplingParams
from rocmforge.server import error_shapes
from rocmforge.server.chat_output import ChatOutput, chat_output, json_reply, tool_sampling
from rocmforge.server.embeddings_api import EmbeddingInput, embed_inputs
from rocmforge.server.error_shapes import ErrorInfo
from rocmforge.server.errors import request_id_of
from rocmforge.server.ollama_models import ModelCard, model_card, rfc3339, verbose_model_info
from rocmforge.server.ollama_protocol import ChatBody, EmbedBody, GenerateBody, LegacyEmbeddingsBody, ModelBody
from rocmforge.server.prompts import encode_chat, encode_text, off_loop
from rocmforge.server.protocol import ChatMessage
from rocmforge.server.state import ServerState
from rocmforge.server.streams import dumps, results_or_disconnect, submit
from rocmforge.server.tool_calls import ParsedToolCall

router = APIRouter()
Body = TypeVar("Body", bound=BaseModel)

OLLAMA_VERSION = "0.13.0"
"""The Ollama release whose API this module follows (``/api/version``; clients gate features on it)."""
NDJSON = "application/x-ndjson"
NEVER_EXPIRES = "9999-12-31T23:59:59Z"
"""``/api/ps``'s ``expires_at``: the model stays loaded whatever ``keep_alive`` says."""


def _shape(info: ErrorInfo) -> dict[str, Any]:
    """Ollama's error body; the field at fault leads the message when it does not already."""
    named = info.param is None or info.message.startswith(info.param)
    return {"error": info.message if named else f"{info.param}: {info.message}"}


error_shapes.register("/api/", _shape)


def _state(request: Request) -> ServerState:
    return request.app.state.rocmforge


_DOCUMENTED_BODIES: list[type[BaseModel]] = []


def _documented_body(model: type[BaseModel]) -> dict[str, Any]:
    """The route's ``requestBody`` for the OpenAPI schema: the routes read their bodies by
    hand (:func:`_body`), so FastAPI does not see them; :func:`add_body_schemas` adds the
    models' schemas to the components."""
    if model not in _DOCUMENTED_BODIES:
        _DOCUMENTED_BODIES.append(model)
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def add_body_schemas(openapi: dict[str, Any]) -> None:
    """Put the bodies of the Ollama routes in an OpenAPI schema's components (in place).
    A name already there is a model shared with the OpenAI routes (``Tool``,
    ``FunctionDefinition``): FastAPI's rendering of it stays."""
    _, definitions = models_json_schema([(model, "validation") for model in _DOCUMENTED_BODIES],
                                        ref_template="#/components/schemas/{model}")
    components = openapi.setdefault("components", {}).setdefault("schemas", {})
    for name, schema in definitions.get("$defs", {}).items():
        components.setdefault(name, schema)


async def _body(request: Request, model: type[Body]) -> Body:
    """The request's JSON body, whatever its content type: Ollama's own server reads it so,
    and its documented examples (``curl -d '{...}'``) send it as a form."""
    raw = await request.body()
    try:
        data = json.loads(raw) if raw.strip() else {}
    except (ValueError, RecursionError):  # invalid UTF-8 is a ValueError too
        raise RequestValidationError([{"type": "json_invalid", "loc": ("body",), "msg": "JSON decode error"}]) \
            from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None


async def _card(state: ServerState) -> ModelCard:
    template = state.tokenizer.chat_template
    serving = (*(("thinking",) if state.reasoning_format is not None else ()),
               *(("embedding",) if state.engine.pooling is not None else ()))
    return await off_loop(state, model_card, state.model_path, state.model_name,
                          template.source if template is not None else None, serving)


async def _served(state: ServerState, name: str | None) -> ModelCard:
    """The card, when ``name`` names the served model; else 404 in Ollama's words."""
    if not name:
        raise InvalidRequestError("model is required", param="model")
    card = await _card(state)
    if not card.accepts(name):
        raise ModelNotFoundError(f"model '{name}' not found")
    return card


def _created_at() -> str:
    return rfc3339(datetime.now(timezone.utc))


# --- replies: reasoning, content and tool calls ------------------------------------------------


@dataclass(slots=True)
class Reply:
    """What the model said, as Ollama's ``message`` carries it."""

    content: str
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    thinking: str | None = None
    """Reasoning separated from the content (the server's reasoning parser); None: none."""

    def message(self) -> dict[str, Any]:
        body: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.thinking:
            body["thinking"] = self.thinking
        if self.tool_calls:
            body["tool_calls"] = self.tool_calls
        return body


def ollama_tool_call(call: ParsedToolCall, index: int) -> dict[str, Any]:
    """A parsed call in Ollama's shape: the arguments an object, not JSON text."""
    return {"id": call.id, "function": {"index": index, "name": call.name, "arguments": json.loads(call.arguments)}}


class ReplyParser:
    """The chat-output layer every chat API shares (:mod:`rocmforge.server.chat_output`:
    reasoning, then tool calls), in Ollama's shapes, whole or streamed. Tool calls come whole,
    with the piece that ends the reply, as Ollama sends them."""

    def __init__(self, output: ChatOutput) -> None:
        self._output = output
        self._stream = output.stream()

    def whole(self, text: str) -> Reply:
        reply = self._output.parse(text)
        return Reply(reply.content or "", [ollama_tool_call(c, i) for i, c in enumerate(reply.calls)],
                     reply.reasoning)

    def feed(self, delta: str) -> Reply:
        """What ``delta`` makes sure: reasoning and content."""
        piece = self._stream.feed(delta)
        return Reply(piece.content, thinking=piece.reasoning or None)

    def finish(self, full_text: str) -> Reply:
        """At the end: what was not sent yet, and the calls."""
        rest = self._stream.finish(full_text)
        return Reply(rest.content, [ollama_tool_call(c, i) for i, c in enumerate(rest.calls)], rest.reasoning or None)


# --- the stats of a finished request ----------------------------------------------------------


def _ns(start: float | None, end: float | None) -> int:
    return round((end - start) * 1e9) if start is not None and end is not None else 0


def _stats(state: ServerState, request_id: str, started_ns: int) -> dict[str, Any]:
    """Ollama's counts and durations (ns): ``load_duration`` is the wait for the engine to
    take the request (the model itself is always loaded), ``prompt_eval_duration`` the
    prefill, ``eval_duration`` the decoding, ``total_duration`` the whole HTTP request."""
    status = state.engine.status(request_id)
    return {
        "total_duration": time.perf_counter_ns() - started_ns,
        "load_duration": _ns(status.arrival_time, status.first_scheduled_time),
        "prompt_eval_count": status.num_prompt_tokens,
        "prompt_eval_duration": _ns(status.first_scheduled_time, status.first_token_time),
        "eval_count": status.num_output_tokens,
        "eval_duration": _ns(status.first_token_time, status.finished_time),
    }


def _done_reason(finish_reason: str | None) -> str:
    """Ollama knows stop and length; a request cancelled at shutdown reads as stop."""
    return "length" if finish_reason == "length" else "stop"


def _logprobs(state: ServerState, entries: Sequence[TokenLogprobs]) -> list[dict[str, Any]]:
    tok = state.tokenizer

    def item(token_id: int, logprob: float) -> dict[str, Any]:
        return {"token": tok.decode([token_id]), "logprob": logprob, "bytes": list(tok.token_bytes(token_id))}

    return [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries]


# --- generation, shared by /api/generate and /api/chat ----------------------------------------


def _max_tokens(state: ServerState, prompt_len: int, num_predict: int | None) -> int:
    """``num_predict``, at most what the context has left; None: all it has left."""
    left = max(1, state.engine.max_model_len - prompt_len)
    return left if num_predict is None else min(num_predict, left)


async def _start(state: ServerState, request: Request, ids: list[int], params: SamplingParams) -> RequestStream:
    try:
        return await submit(state, ids, params, request_id_of(request) or uuid.uuid4().hex)
    except InvalidGrammarError as exc:  # the only constraint an Ollama request carries is its format
        raise InvalidGrammarError(exc.message, param="format") from None


@dataclass(frozen=True, slots=True)
class _Generation:
    """One running request and how to write its answer: ``/api/generate`` objects carry
    ``response`` (and ``context``), ``/api/chat`` objects a ``message``."""

    state: ServerState
    stream: RequestStream
    model: str
    chat: bool
    parser: ReplyParser
    started_ns: int
    context: list[int] | None
    """The prompt's ids, when the answer returns Ollama's ``context`` (``/api/generate``, not raw)."""

    def body(self, reply: Reply, **extra: Any) -> dict[str, Any]:
        head: dict[str, Any] = {"model": self.model, "created_at": _created_at()}
        if self.chat:
            head["message"] = reply.message()
        else:
            head["response"] = reply.content
            if reply.thinking:
                head["thinking"] = reply.thinking
        return {**head, **extra}

    def final(self, reply: Reply, finish_reason: str | None, output_ids: list[int],
              logprobs: Sequence[TokenLogprobs] | None) -> dict[str, Any]:
        extra: dict[str, Any] = {"done": True, "done_reason": _done_reason(finish_reason)}
        if self.context is not None:
            extra["context"] = [*self.context, *output_ids]
        extra.update(_stats(self.state, self.stream.request_id, self.started_ns))
        if logprobs is not None:
            extra["logprobs"] = _logprobs(self.state, logprobs)
        return self.body(reply, **extra)

    async def answer(self, request: Request, streamed: bool) -> JSONResponse | StreamingResponse | dict[str, Any]:
        if streamed:
            return StreamingResponse(self._lines(), media_type=NDJSON)
        results = await results_or_disconnect(request, [self.stream])
        if results is None:  # the client went away; its request was cancelled
            return JSONResponse({}, status_code=499)
        [completion] = results
        return self.final(self.parser.whole(completion.text), completion.finish_reason, completion.token_ids,
                          completion.logprobs)

    async def _lines(self) -> AsyncIterator[str]:
        output_ids: list[int] = []
        async with self.stream:  # leaving early (the client went away) cancels the request
            try:
                async for output in self.stream:
                    output_ids.extend(output.new_token_ids)
                    piece = self.parser.feed(output.delta_text)
                    if output.finished and output.finish_reason == "error":
                        yield _line({"error": output.error or "generation failed"})
                        return
                    logprobs = _logprobs(self.state, output.new_logprobs) if output.new_logprobs else None
                    if piece.content or piece.thinking or logprobs:
                        extra = {"logprobs": logprobs} if logprobs else {}
                        yield _line(self.body(piece, done=False, **extra))
                    if output.finished:
                        rest = self.parser.finish(output.text)
                        if rest.content or rest.tool_calls or rest.thinking:
                            yield _line(self.body(rest, done=False))
                        yield _line(self.final(Reply(""), output.finish_reason, output_ids, None))
            except RocmForgeError as exc:
                yield _line({"error": exc.message})


def _line(data: dict[str, Any]) -> str:
    return dumps(data) + "\n"


def _loaded(model: str, chat: bool, reason: str = "load") -> dict[str, Any]:
    """The answer to a request without a prompt: Ollama's way to load a model."""
    body: dict[str, Any] = {"model": model, "created_at": _created_at()}
    body.update({"message": {"role": "assistant", "content": ""}} if chat else {"response": ""})
    return {**body, "done": True, "done_reason": reason}


# --- /api/generate, /api/chat ----------------------------------------------------------------


@router.post("/api/generate", response_model=None, openapi_extra=_documented_body(GenerateBody))
async def generate(request: Request) -> JSONResponse | StreamingResponse | dict[str, Any]:
    started = time.perf_counter_ns()
    state = _state(request)
    body = await _body(request, GenerateBody)
    card = await _served(state, body.model)
    if not body.prompt:
        return _loaded(card.name, chat=False)
    _check_think(state, body.think)
    ids = await _generate_prompt(state, body)
    prompt = [*(body.context or ()), *ids]
    params = body.sampling_params(_max_tokens(state, len(prompt), body.num_predict))
    stream = await _start(state, request, prompt, params)
    output = chat_output(state, prompt, calls_tools=False, json_only=json_reply(params, False))
    parser = ReplyParser(output if not body.raw else ChatOutput())
    generation = _Generation(state, stream, card.name, chat=False, parser=parser,
                             started_ns=started, context=None if body.raw else prompt)
    return await generation.answer(request, body.stream)


async def _generate_prompt(state: ServerState, body: GenerateBody) -> list[int]:
    """``raw``: the prompt as it is; otherwise through the chat template as a user turn
    (after the ``system`` message), or as it is for a model without a template."""
    if body.raw:
        return await encode_text(state, body.prompt, add_special=True)
    if state.tokenizer.chat_template is None:
        if body.system:
            raise ChatTemplateError("this model has no chat template to place a system message in", param="system")
        return await encode_text(state, body.prompt, add_special=True)
    messages = [ChatMessage(role="user", content=body.prompt)]
    if body.system:
        messages.insert(0, ChatMessage(role="system", content=body.system))
    return await encode_chat(state, messages, None, _think_variables(body.think))


def _check_think(state: ServerState, think: object) -> None:
    """``think`` on a model whose reasoning the server does not split out: Ollama's 400."""
    if think not in (None, False) and state.reasoning_format is None:
        raise InvalidRequestError(f"{state.model_name!r} does not support thinking", param="think")


def _think_variables(think: object) -> dict[str, Any] | None:
    """``think: false`` reaches the template as ``enable_thinking`` false (Qwen3's switch)."""
    return {"enable_thinking": False} if think is False else None


@router.post("/api/chat", response_model=None, openapi_extra=_documented_body(ChatBody))
async def chat(request: Request) -> JSONResponse | StreamingResponse | dict[str, Any]:
    started = time.perf_counter_ns()
    state = _state(request)
    body = await _body(request, ChatBody)
    card = await _served(state, body.model)
    if not body.messages:
        return _loaded(card.name, chat=True)
    _check_think(state, body.think)
    tools = body.tool_dicts()
    ids = await encode_chat(state, body.chat_messages(), tools, _think_variables(body.think))
    _, kept = tool_sampling(state, None, parallel=True, calls_tools=tools is not None)
    params = replace(body.sampling_params(_max_tokens(state, len(ids), body.num_predict)),
                     keep_special_token_ids=kept)
    output = chat_output(state, ids, calls_tools=tools is not None, json_only=json_reply(params, False))
    stream = await _start(state, request, ids, params)
    generation = _Generation(state, stream, card.name, chat=True, parser=ReplyParser(output),
                             started_ns=started, context=None)
    return await generation.answer(request, body.stream)


# --- /api/embed, /api/embeddings ------------------------------------------------------------


@router.post("/api/embed", response_model=None, openapi_extra=_documented_body(EmbedBody))
async def embed(request: Request) -> JSONResponse | dict[str, Any]:
    """Ollama's embeddings: unit vectors, one per input, through the engine's pooling (the
    same path as ``/v1/embeddings``); with ``truncate`` (the default) an input longer than the
    context is cut to it."""
    started = time.perf_counter_ns()
    state = _state(request)
    body = await _body(request, EmbedBody)
    card = await _served(state, body.model)
    inputs: list[EmbeddingInput] = list(body.inputs())
    if body.truncate:
        limit = state.engine.max_model_len
        # Tokenized whole (the body limit bounds the work), then cut: no length check first.
        inputs = [(await off_loop(state, state.tokenizer.encode, text, True))[:limit] if text else text
                  for text in body.inputs()]
    result = await embed_inputs(state, request, inputs, PoolingParams(dimensions=body.dimensions),
                                request_id_of(request) or uuid.uuid4().hex)
    if result is None:  # the client went away; its requests were cancelled
        return JSONResponse({}, status_code=499)
    return {"model": card.name, "embeddings": result.vectors, "total_duration": time.perf_counter_ns() - started,
            "load_duration": 0, "prompt_eval_count": result.prompt_tokens}


@router.post("/api/embeddings", response_model=None, openapi_extra=_documented_body(LegacyEmbeddingsBody))
async def embeddings(request: Request) -> JSONResponse | dict[str, Any]:
    """Ollama's older route: one ``prompt``, its pooled vector as it is (not normalised)."""
    state = _state(request)
    body = await _body(request, LegacyEmbeddingsBody)
    await _served(state, body.model)
    result = await embed_inputs(state, request, [body.prompt], PoolingParams(normalize=False),
                                request_id_of(request) or uuid.uuid4().hex)
    if result is None:
        return JSONResponse({}, status_code=499)
    return {"embedding": result.vectors[0]}


# --- the model: /api/tags, /api/show, /api/ps, /api/version, / ---------------------------------


@router.get("/api/tags")
async def tags(request: Request) -> dict[str, Any]:
    return {"models": [(await _card(_state(request))).listing()]}


@router.post("/api/show", openapi_extra=_documented_body(ModelBody))
async def show(request: Request) -> dict[str, Any]:
    state = _state(request)
    body = await _body(request, ModelBody)
    card = await _served(state, body.model_name())
    info = {**card.model_info, **await off_loop(state, verbose_model_info, card.path)} if body.verbose \
        else card.model_info
    return {
        "modelfile": f"# Modelfile generated by rocmforge\nFROM {card.path}\n",
        "parameters": "",
        "template": card.template,
        "license": card.license,
        "details": card.details,
        "model_info": info,
        "capabilities": card.capabilities,
        "modified_at": card.modified_at,
    }


@router.get("/api/ps")
async def ps(request: Request) -> dict[str, Any]:
    state = _state(request)
    card = await _card(state)
    plan = state.memory_plan
    size = card.size if plan is None else plan.weight_bytes + plan.kv_bytes
    return {"models": [{**card.listing(), "expires_at": NEVER_EXPIRES, "size": size,
                        "size_vram": size if state.device.startswith("cuda") else 0,
                        "context_length": state.engine.max_model_len}]}


@router.get("/api/version")
async def version() -> dict[str, str]:
    return {"version": OLLAMA_VERSION, "rocmforge_version": __version__}


@router.get("/", response_class=PlainTextResponse)
@router.head("/", response_class=PlainTextResponse, include_in_schema=False)  # curl -I, probes
async def root() -> str:
    """Ollama's clients probe the server here."""
    return "Ollama is running"


# --- model management: one model, fixed at start-up -------------------------------------------


@router.post("/api/pull", response_model=None, openapi_extra=_documented_body(ModelBody))
async def pull(request: Request) -> dict[str, Any] | StreamingResponse:
    """The served model is here already: success at once (clients pull before they use a
    model). Any other is refused."""
    state = _state(request)
    body = await _body(request, ModelBody)
    name = body.model_name()
    card = await _card(state)
    if not card.accepts(name):
        raise UnsupportedOperationError(f"cannot pull '{name}': this server serves '{card.name}' only, "
                                        "fixed at start-up")
    if body.stream:
        return StreamingResponse(iter([_line({"status": "success"})]), media_type=NDJSON)
    return {"status": "success"}


def _refuse(action: str) -> NoReturn:
    raise UnsupportedOperationError(f"cannot {action} models: this server serves one model, fixed at start-up")


@router.post("/api/push", response_model=None)
async def push() -> NoReturn:
    _refuse("push")


@router.post("/api/create", response_model=None)
async def create() -> NoReturn:
    _refuse("create")


@router.post("/api/copy", response_model=None)
async def copy() -> NoReturn:
    _refuse("copy")


@router.delete("/api/delete", response_model=None)
async def delete() -> NoReturn:
    _refuse("delete")
