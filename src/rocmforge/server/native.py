"""The native API: ``/generate``, ``/generate/stream``, ``/status/{id}``, ``/cancel/{id}``,
``/models``, ``/tokenize``, ``/detokenize``.

In: JSON bodies (:mod:`rocmforge.server.protocol`). Out: JSON, or server-sent events
(``event: delta`` per text delta, then ``event: done`` with the finish reason and usage, plus a
``message`` when the engine ended the request early, e.g. cancelled at shutdown, or
``event: error`` with the error shape).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from rocmforge import __version__
from rocmforge.errors import InvalidRequestError, RocmForgeError
from rocmforge.server.errors import request_id_of
from rocmforge.server.prompts import decode, encode_chat, encode_text, off_loop
from rocmforge.server.protocol import DetokenizeRequest, GenerateRequest, TokenizeRequest
from rocmforge.server.state import ServerState
from rocmforge.server.streams import generation_error, logprob_entries, results_or_disconnect, sse, submit, timings

router = APIRouter()

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _state(request: Request) -> ServerState:
    return request.app.state.rocmforge


async def _prompt_ids(state: ServerState, body: GenerateRequest) -> list[int]:
    if isinstance(body.prompt, str):
        return await encode_text(state, body.prompt, add_special=body.add_special_tokens)
    return list(body.prompt)


@router.post("/generate")
async def generate(body: GenerateRequest, request: Request) -> Any:
    state = _state(request)
    request_id = request_id_of(request) or ""
    stream = await submit(state, await _prompt_ids(state, body), body.to_sampling_params(), request_id)
    results = await results_or_disconnect(request, [stream])
    if results is None:  # the client went away; its request was cancelled
        return JSONResponse({}, status_code=499)
    [completion] = results
    status = state.engine.status(stream.request_id)
    return {
        "request_id": stream.request_id,
        "text": completion.text,
        "token_ids": completion.token_ids,
        "num_prompt_tokens": len(completion.prompt_token_ids),
        "num_generated_tokens": len(completion.token_ids),
        "finish_reason": completion.finish_reason,
        "stop_reason": completion.stop_reason,
        "error": status.error,
        "logprobs": logprob_entries(state.tokenizer, completion.logprobs) if completion.logprobs else None,
        "timings": timings(status),
    }


@router.post("/generate/stream")
async def generate_stream(body: GenerateRequest, request: Request) -> StreamingResponse:
    state = _state(request)
    request_id = request_id_of(request) or ""
    stream = await submit(state, await _prompt_ids(state, body), body.to_sampling_params(), request_id)

    async def events() -> AsyncIterator[str]:
        async with stream:  # leaving early (client disconnect) cancels the request
            try:
                async for output in stream:
                    if output.delta_text or output.new_token_ids:
                        yield sse(
                            {"request_id": output.request_id, "delta": output.delta_text,
                             "token_ids": output.new_token_ids},
                            event="delta",
                        )
                    if output.finished:
                        if output.finish_reason == "error":
                            yield sse(generation_error(output.request_id, output.error), event="error")
                            return
                        status = state.engine.status(output.request_id)
                        yield sse(
                            {
                                "request_id": output.request_id,
                                "finish_reason": output.finish_reason,
                                "stop_reason": output.stop_reason,
                                "usage": {
                                    "prompt_tokens": output.num_prompt_tokens,
                                    "completion_tokens": output.num_output_tokens,
                                    "total_tokens": output.num_prompt_tokens + output.num_output_tokens,
                                },
                                "timings": timings(status),
                                # Why the engine ended it early (e.g. cancelled at shutdown).
                                **({"message": output.error} if output.error else {}),
                            },
                            event="done",
                        )
            except RocmForgeError as exc:
                yield sse({"error": {**exc.to_dict(), "request_id": stream.request_id}}, event="error")

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)


@router.get("/status/{request_id:path}")  # ids may hold "/" (X-Request-Id)
async def status(request_id: str, request: Request) -> dict[str, Any]:
    s = _state(request).engine.status(request_id)
    return {
        "request_id": s.request_id,
        "state": s.state.value,
        "finish_reason": s.finish_reason,
        "error": s.error,
        "queue_position": s.queue_position,
        "num_prompt_tokens": s.num_prompt_tokens,
        "num_generated_tokens": s.num_output_tokens,
        "num_cached_tokens": s.num_cached_tokens,
        "num_preemptions": s.num_preemptions,
        "timings": timings(s),
    }


@router.post("/cancel/{request_id:path}")
async def cancel(request_id: str, request: Request) -> dict[str, Any]:
    engine = _state(request).engine
    cancelled = await engine.cancel(request_id)
    s = engine.status(request_id)
    return {"request_id": request_id, "cancelled": cancelled, "state": s.state.value, "finish_reason": s.finish_reason}


@router.get("/models")
async def models(request: Request) -> dict[str, Any]:
    state = _state(request)
    return {
        "models": [
            {
                "id": state.model_name,
                "path": state.model_path,
                "max_model_len": state.engine.max_model_len,
                "vocab_size": state.tokenizer.vocab_size,
                "has_chat_template": state.tokenizer.chat_template is not None,
                "rocmforge_version": __version__,
            }
        ]
    }


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> dict[str, Any]:
    state = _state(request)
    if (body.prompt is None) == (body.messages is None):
        raise InvalidRequestError("give exactly one of prompt or messages", param="prompt")
    if body.messages is not None:
        ids = await encode_chat(state, body.messages)
    else:
        ids = await off_loop(state, state.tokenizer.encode, body.prompt or "", body.add_special_tokens)
    return {"tokens": ids, "count": len(ids), "max_model_len": state.engine.max_model_len}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> dict[str, Any]:
    state = _state(request)
    vocab = state.engine.vocab_size
    bad = next((t for t in body.tokens if t >= vocab), None)
    if bad is not None:
        raise InvalidRequestError(f"token id {bad} is outside the vocabulary (size {vocab})", param="tokens")
    return {"prompt": await decode(state, body.tokens)}
