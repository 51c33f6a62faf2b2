"""OpenAI-compatible routes: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``.

Bodies follow the OpenAI API (plus vLLM's extra sampling fields: ``top_k``, ``min_p``,
``repetition_penalty``, ``stop_token_ids``, ``ignore_eos``, ``min_tokens``); the official
``openai`` client works unchanged. Streams are ``data: {chunk}`` events ending with
``data: [DONE]``. ``n`` choices run as ``n`` engine requests (seeded ones with
``seed + index``), so they batch together.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from rocmforge.errors import InvalidGrammarError, InvalidRequestError, ModelNotFoundError, RocmForgeError
from rocmforge.outputs import Completion, TokenLogprobs
from rocmforge.sampling_params import SamplingParams
from rocmforge.server import anthropic_api
from rocmforge.server.chat_output import ChatOutput, ParsedReply, ReplyDelta, chat_output, json_reply, tool_sampling
from rocmforge.server.errors import request_id_of
from rocmforge.server.prompts import check_fanout, decode, encode_chat, encode_texts
from rocmforge.server.protocol import ChatCompletionRequest, CompletionRequest
from rocmforge.server.state import ServerState
from rocmforge.server.streams import generation_error, merged, now, results_or_disconnect, sse, submit

router = APIRouter(prefix="/v1")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _state(request: Request) -> ServerState:
    return request.app.state.rocmforge


def _check_model(state: ServerState, model: str | None) -> None:
    if model is not None and model != state.model_name:
        raise ModelNotFoundError(f"model {model!r} is not served here (this server serves {state.model_name!r})")


def _max_tokens(state: ServerState, prompt_len: int, requested: int | None) -> int:
    """OpenAI semantics: an explicit max_tokens must fit; a missing one fills the context."""
    if requested is not None:
        return requested
    return max(1, min(state.config.default_max_tokens, state.engine.max_model_len - prompt_len))


def _choices_params(params: SamplingParams, n: int) -> list[SamplingParams]:
    if n == 1:
        return [params]
    return [replace(params, seed=None if params.seed is None else params.seed + i) for i in range(n)]


async def _submit_all(
    state: ServerState, request_id: str, prompts: list[list[int]], params: list[SamplingParams]
) -> list[Any]:
    """Submit every choice at once (they are admitted in the same engine round); if any is
    refused, the others are cancelled and the first refusal is raised."""
    results = await asyncio.gather(
        *(submit(state, ids, p, f"{request_id}-{i}" if len(prompts) > 1 else request_id)
          for i, (ids, p) in enumerate(zip(prompts, params))),
        return_exceptions=True,
    )
    streams = [r for r in results if not isinstance(r, BaseException)]
    error = next((r for r in results if isinstance(r, BaseException)), None)
    if error is not None:
        for stream in streams:
            await stream.aclose()
        raise error
    return streams


def _usage(results: Sequence[Completion], n: int) -> dict[str, Any]:
    """Each prompt counts once, whatever the number of choices generated from it; its cached
    tokens are those of its first choice's request."""
    prompt = sum(len(r.prompt_token_ids) for r in results[::n])
    completion = sum(len(r.token_ids) for r in results)
    cached = sum(r.num_cached_tokens for r in results[::n])
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


# --- /v1/models ---------------------------------------------------------------------------


@router.get("/models")
async def list_models(request: Request) -> dict[str, Any]:
    state = _state(request)
    if anthropic_api.VERSION_HEADER in request.headers:  # Anthropic's SDK: its own shape
        return anthropic_api.model_list(state)
    return {
        "object": "list",
        "data": [{"id": state.model_name, "object": "model", "created": int(state.started_at),
                  "owned_by": "rocmforge", "max_model_len": state.engine.max_model_len}],
    }


# --- /v1/completions ----------------------------------------------------------------------


@router.post("/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request) -> JSONResponse | StreamingResponse | dict[str, Any]:
    state = _state(request)
    _check_model(state, body.model)
    if body.echo and body.logprobs is not None:
        raise InvalidRequestError("echo together with logprobs is not supported", param="echo")
    prompts = await _prompt_list(state, body.prompt)
    check_fanout(state, len(prompts), body.n)
    params = [
        p
        for ids in prompts
        for p in _choices_params(body.to_sampling_params(_max_tokens(state, len(ids), body.max_tokens)), body.n)
    ]
    flat_prompts = [ids for ids in prompts for _ in range(body.n)]
    request_id = request_id_of(request) or uuid.uuid4().hex
    streams = await _submit_all(state, request_id, flat_prompts, params)
    completion_id = f"cmpl-{request_id}"
    texts = [await decode(state, ids) for ids in prompts] if body.echo else None

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _completion_events(state, streams, completion_id, body.n, texts, include_usage),
            media_type="text/event-stream",
            headers=SSE_HEADERS,
        )
    results = await results_or_disconnect(request, streams)
    if results is None:
        return JSONResponse({}, status_code=499)
    choices = []
    for index, result in enumerate(results):
        prefix = texts[index // body.n] if texts else ""
        choices.append({
            "index": index,
            "text": prefix + result.text,
            "finish_reason": _finish(result.finish_reason),
            "stop_reason": result.stop_reason,
            "logprobs": _completion_logprobs(state, result.logprobs) if result.logprobs is not None else None,
        })
    return {"id": completion_id, "object": "text_completion", "created": now(), "model": state.model_name,
            "choices": choices, "usage": _usage(results, body.n)}


async def _prompt_list(state: ServerState, prompt: str | list[int] | list[str]) -> list[list[int]]:
    texts: list[str] = []
    if isinstance(prompt, str):
        texts = [prompt]
    elif all(isinstance(p, str) for p in prompt):
        texts = [p for p in prompt if isinstance(p, str)]
    else:
        return [[p for p in prompt if isinstance(p, int)]]
    if any(not p for p in texts):
        raise InvalidRequestError("prompt must not be empty", param="prompt")
    check_fanout(state, len(texts), 1)  # before tokenizing any of them
    return await encode_texts(state, texts, add_special=True)


async def _completion_events(
    state: ServerState, streams: list[Any], completion_id: str, n: int, texts: list[str] | None, include_usage: bool
) -> AsyncIterator[str]:
    created, model = now(), state.model_name
    usage = {"prompt_tokens": 0, "completion_tokens": 0}
    cached = 0
    echoed: set[int] = set()
    try:
        async for index, output in merged(streams):
            text = output.delta_text
            if texts and index not in echoed:
                echoed.add(index)
                text = texts[index // n] + text
            choice: dict[str, Any] = {"index": index, "text": text, "finish_reason": None, "logprobs": None}
            if output.new_logprobs:
                choice["logprobs"] = _completion_logprobs(state, output.new_logprobs)
            if output.finished:
                if output.finish_reason == "error":
                    yield sse(generation_error(output.request_id, output.error))
                    return
                choice["finish_reason"] = _finish(output.finish_reason)
                choice["stop_reason"] = output.stop_reason
                usage["completion_tokens"] += output.num_output_tokens
                if index % n == 0:
                    usage["prompt_tokens"] += output.num_prompt_tokens
                    cached += output.num_cached_tokens
            if text or output.finished or choice["logprobs"]:
                yield sse({"id": completion_id, "object": "text_completion", "created": created, "model": model,
                           "choices": [choice]})
        if include_usage:
            totals = {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"],
                      "prompt_tokens_details": {"cached_tokens": cached}}
            yield sse({"id": completion_id, "object": "text_completion", "created": created, "model": model,
                       "choices": [], "usage": totals})
        yield sse("[DONE]")
    except RocmForgeError as exc:
        yield sse({"error": {**exc.to_dict(), "request_id": completion_id}})


def _completion_logprobs(state: ServerState, entries: Sequence[TokenLogprobs]) -> dict[str, Any]:
    decode = state.tokenizer.decode
    tokens = [decode([e.token_id]) for e in entries]
    offsets, offset = [], 0
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{decode([t]): lp for t, lp in e.top} for e in entries],
        "text_offset": offsets,
    }


def _finish(reason: str | None) -> str | None:
    """OpenAI knows stop and length; a cancelled or failed request reads as stop."""
    return "length" if reason == "length" else "stop" if reason is not None else None


# --- /v1/chat/completions -----------------------------------------------------------------


@router.post("/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> JSONResponse | StreamingResponse | dict[str, Any]:
    state = _state(request)
    _check_model(state, body.model)
    check_fanout(state, 1, body.n)
    prompt = await encode_chat(state, body.messages, body.tool_dicts(), body.chat_template_kwargs)
    grammar, kept = tool_sampling(state, body.forced_tools(), parallel=body.parallel_tool_calls,
                                  calls_tools=body.calls_tools)
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    sampling = body.to_sampling_params(_max_tokens(state, len(prompt), requested), tool_grammar=grammar,
                                       keep_special_token_ids=kept)
    output = chat_output(state, prompt, body.calls_tools, json_only=json_reply(sampling, grammar is not None))
    params = _choices_params(sampling, body.n)
    request_id = request_id_of(request) or uuid.uuid4().hex
    try:
        streams = await _submit_all(state, request_id, [prompt] * body.n, params)
    except InvalidGrammarError as exc:
        if body.forced_tools() is None:
            raise
        raise InvalidGrammarError(f"the tools' parameters do not compile: {exc.message}", param="tools") from None
    completion_id = f"chatcmpl-{request_id}"

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_chat_events(state, streams, completion_id, include_usage, output),
                                 media_type="text/event-stream", headers=SSE_HEADERS)
    results = await results_or_disconnect(request, streams)
    if results is None:
        return JSONResponse({}, status_code=499)
    choices = [
        {
            "index": index,
            **_chat_message(result, output.parse(result.text)),
            "stop_reason": result.stop_reason,
            "logprobs": {"content": _chat_logprobs(state, result.logprobs)} if result.logprobs is not None else None,
        }
        for index, result in enumerate(results)
    ]
    return {"id": completion_id, "object": "chat.completion", "created": now(), "model": state.model_name,
            "choices": choices, "usage": _usage(results, body.n)}


def _chat_message(result: Completion, reply: ParsedReply) -> dict[str, Any]:
    """A choice's ``message`` and ``finish_reason``: its reasoning (``reasoning_content``,
    when the server splits it out), its text, and its tool calls when the request offered
    tools and the model called some (finish reason ``tool_calls``)."""
    message: dict[str, Any] = {"role": "assistant", "content": reply.content}
    if reply.reasoning is not None:
        message["reasoning_content"] = reply.reasoning
    if not reply.calls:
        return {"message": message, "finish_reason": _finish(result.finish_reason)}
    message["tool_calls"] = [call.to_openai() for call in reply.calls]
    return {"message": message, "finish_reason": "tool_calls"}


def _delta(piece: ReplyDelta) -> dict[str, Any]:
    delta: dict[str, Any] = {}
    if piece.reasoning:
        delta["reasoning_content"] = piece.reasoning
    if piece.content:
        delta["content"] = piece.content
    if piece.tool_calls:
        delta["tool_calls"] = piece.tool_calls
    return delta


async def _chat_events(state: ServerState, streams: list[Any], completion_id: str, include_usage: bool,
                       output: ChatOutput) -> AsyncIterator[str]:
    created, model = now(), state.model_name
    choice_streams = [output.stream() for _ in streams]

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        return sse({"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": choices, **extra})

    usage = {"prompt_tokens": 0, "completion_tokens": 0}
    cached = 0
    try:
        for index in range(len(streams)):
            yield chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                          "logprobs": None}])
        async for index, result in merged(streams):
            choice: dict[str, Any] = {"index": index, "delta": {}, "finish_reason": None, "logprobs": None}
            if result.finished and result.finish_reason == "error":
                yield sse(generation_error(result.request_id, result.error))
                return
            piece = choice_streams[index].feed(result.delta_text)
            called = False
            if result.finished:
                rest = choice_streams[index].finish(result.text)
                called = bool(rest.calls)
                piece = ReplyDelta(piece.reasoning + rest.reasoning, piece.content + rest.content,
                                   _merge_call_deltas(piece.tool_calls + rest.tool_calls))
            choice["delta"] = _delta(piece)
            if result.new_logprobs:
                choice["logprobs"] = {"content": _chat_logprobs(state, result.new_logprobs)}
            if result.finished:
                choice["finish_reason"] = "tool_calls" if called else _finish(result.finish_reason)
                usage["completion_tokens"] += result.num_output_tokens
                if index == 0:
                    usage["prompt_tokens"] = result.num_prompt_tokens
                    cached = result.num_cached_tokens
            if choice["delta"] or result.finished or choice["logprobs"]:
                yield chunk([choice])
        if include_usage:
            yield chunk([], usage={**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"],
                                   "prompt_tokens_details": {"cached_tokens": cached}})
        yield sse("[DONE]")
    except RocmForgeError as exc:
        yield sse({"error": {**exc.to_dict(), "request_id": completion_id}})


def _merge_call_deltas(deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Deltas of one chunk, one per call index (argument pieces joined)."""
    merged_by_index: dict[int, dict[str, Any]] = {}
    for delta in deltas:
        into = merged_by_index.get(delta["index"])
        if into is None:
            merged_by_index[delta["index"]] = {**delta, "function": dict(delta["function"])}
            continue
        for key, value in delta.items():
            if key == "function":
                for name, text in value.items():
                    into["function"][name] = into["function"].get(name, "") + text
            elif key != "index":
                into[key] = value
    return list(merged_by_index.values())


def _chat_logprobs(state: ServerState, entries: Sequence[TokenLogprobs]) -> list[dict[str, Any]]:
    tok = state.tokenizer

    def item(token_id: int, logprob: float) -> dict[str, Any]:
        return {"token": tok.decode([token_id]), "logprob": logprob, "bytes": list(tok.token_bytes(token_id))}

    return [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries]
