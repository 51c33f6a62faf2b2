"""Helpers shared by the routes: submitting, awaiting with disconnect detection, SSE framing,
and the JSON encoding of every answer.

JSON is written as UTF-8 with non-ASCII characters as they are, except where a string holds a
lone surrogate (an error message quoting what a client sent): that body is written with ASCII
escapes instead, which is valid JSON for any string, so no answer can fail to encode.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Coroutine, Sequence
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse

from rocmforge.engine.request_status import RequestStatus
from rocmforge.engine.request_stream import RequestStream
from rocmforge.errors import InvalidGrammarError, ServerDrainingError
from rocmforge.outputs import Completion, EmbeddingOutput, RequestOutput, TokenLogprobs
from rocmforge.pooling_params import PoolingParams
from rocmforge.sampling_params import SamplingParams
from rocmforge.server.protocol import structured_param
from rocmforge.server.state import ServerState

DISCONNECT_POLL_S = 0.2

T = TypeVar("T")


async def submit(state: ServerState, prompt_ids: Sequence[int], params: SamplingParams | PoolingParams,
                 request_id: str) -> RequestStream:
    if state.draining:
        raise ServerDrainingError("the server is shutting down and accepts no new requests")
    try:
        return await state.engine.submit(prompt_ids, params, request_id=request_id)
    except InvalidGrammarError as exc:  # the engine names the constraint's kind; say the API field
        raise InvalidGrammarError(exc.message, param=structured_param(exc.param) if exc.param else None) from None


async def results_or_disconnect(request: Request, streams: list[RequestStream]) -> list[Completion] | None:
    """Wait for every stream's completion; if the client goes away first, cancel them all
    and return None."""
    return await awaited_or_disconnect(request, streams, [s.result() for s in streams])


async def embeddings_or_disconnect(request: Request, streams: list[RequestStream]) -> list[EmbeddingOutput] | None:
    """:func:`results_or_disconnect` for embedding requests' streams."""
    return await awaited_or_disconnect(request, streams, [s.embedding() for s in streams])


async def awaited_or_disconnect(request: Request, streams: list[RequestStream],
                                results: list[Coroutine[Any, Any, T]]) -> list[T] | None:
    """Wait for ``results`` (one per stream, read from it); if the client goes away first,
    cancel every stream and return None."""
    gathered = asyncio.ensure_future(asyncio.gather(*results))
    # A cancelled gather ends with a CancelledError *exception*: mark it retrieved, or asyncio
    # logs "exception was never retrieved" with a traceback for every client that went away.
    gathered.add_done_callback(_retrieve_exception)
    try:
        while True:
            done, _ = await asyncio.wait({gathered}, timeout=DISCONNECT_POLL_S)
            if done:
                return gathered.result()
            if await request.is_disconnected():
                gathered.cancel()
                for stream in streams:
                    await stream.aclose()
                return None
    finally:
        if not gathered.done():
            gathered.cancel()


def _retrieve_exception(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


async def merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several streams' outputs as they come, tagged with the stream's index."""
    queue: asyncio.Queue[tuple[int, RequestOutput | None]] = asyncio.Queue()

    async def pump(index: int, stream: RequestStream) -> None:
        async for output in stream:
            await queue.put((index, output))
        await queue.put((index, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(streams)
    try:
        while remaining:
            index, output = await queue.get()
            if output is None:
                remaining -= 1
                continue
            yield index, output
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            await stream.aclose()


def generation_error(request_id: str, message: str | None) -> dict[str, Any]:
    """The error-shape body of a stream's error event (a request that failed in the engine)."""
    return {"error": {"type": "internal", "code": "generation_failed", "message": message or "generation failed",
                      "param": None, "request_id": request_id}}


def dumps(data: Any, *, allow_nan: bool = True) -> str:
    """JSON text that always encodes to UTF-8 (module docstring)."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=allow_nan)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(data, allow_nan=allow_nan)
    return text


class SafeJSONResponse(JSONResponse):
    """The app's JSON response: :func:`dumps`, never a failed encode."""

    def render(self, content: Any) -> bytes:
        return dumps(content, allow_nan=False).encode("utf-8")  # as starlette's JSONResponse


def sse(data: Any, event: str | None = None) -> str:
    prefix = f"event: {event}\n" if event else ""
    payload = data if isinstance(data, str) else dumps(data)
    return f"{prefix}data: {payload}\n\n"


def timings(status: RequestStatus) -> dict[str, float | None]:
    """Per-phase durations in milliseconds from a request's monotonic timestamps."""

    def ms(start: float | None, end: float | None) -> float | None:
        return round((end - start) * 1000, 3) if start is not None and end is not None else None

    return {
        "queue_ms": ms(status.arrival_time, status.first_scheduled_time),
        "prefill_ms": ms(status.first_scheduled_time, status.first_token_time),
        "decode_ms": ms(status.first_token_time, status.finished_time),
        "time_to_first_token_ms": ms(status.arrival_time, status.first_token_time),
        "total_ms": ms(status.arrival_time, status.finished_time),
    }


def logprob_entries(tokenizer: Any, entries: Sequence[TokenLogprobs]) -> list[dict[str, Any]]:
    """Native-API logprobs: one object per token with its text and the top alternatives."""
    return [
        {
            "token_id": e.token_id,
            "token": tokenizer.decode([e.token_id]),
            "logprob": e.logprob,
            "top": [{"token_id": t, "token": tokenizer.decode([t]), "logprob": lp} for t, lp in e.top],
        }
        for e in entries
    ]


def now() -> int:
    return int(time.time())
