"""``RequestStream``: one request's outputs as an async iterator (what ``AsyncEngine.submit``
returns). A stream whose consumer goes away cancels its request.

It needs three things of whoever feeds it, the :class:`StreamOwner` protocol (the async
engine is one): whether the engine is alive (to tell a failed request from a dead engine),
a cancel to await, and a cancel that does not wait (from ``__del__`` or a cancelled task)."""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Protocol

from rocmforge.engine.async_commands import Sink
from rocmforge.engine.request import FinishReason
from rocmforge.errors import EngineDeadError, ModelExecutionError, RequestCancelledError, RequestNotFoundError
from rocmforge.outputs import Completion, EmbeddingOutput, RequestOutput, TokenLogprobs
from rocmforge.pooling_params import PoolingParams
from rocmforge.sampling_params import SamplingParams


class StreamOwner(Protocol):
    """What a :class:`RequestStream` needs of the engine that feeds it."""

    @property
    def is_alive(self) -> bool: ...

    async def cancel(self, request_id: str) -> bool: ...

    def cancel_nowait(self, request_id: str) -> None: ...


class RequestStream:
    """Async iterator of one request's :class:`RequestOutput` deltas, ending after the
    finished output (``finish_reason`` ``stop`` | ``length`` | ``cancelled`` | ``error``).

    Owned by the consumer, on the event loop that called ``submit``. Leaving early cancels
    the request: ``aclose()`` / ``async with`` exit, dropping the stream, or cancelling the
    task that awaits the next output (so ``asyncio.wait_for(stream.__anext__(), t)`` timing
    out cancels it too)."""

    def __init__(
        self, engine: StreamOwner, sink: Sink, prompt_token_ids: list[int], params: SamplingParams | PoolingParams
    ) -> None:
        self._engine = engine
        self._sink = sink
        self._prompt_token_ids = prompt_token_ids
        self._params = params
        self._closed = False
        self._final: RequestOutput | None = None
        self._token_ids: list[int] = []
        self._text = ""
        self._num_cached_tokens = 0
        self._logprobs: list[TokenLogprobs] = []
        self._prompt_logprobs: list[TokenLogprobs] | None = None

    @property
    def request_id(self) -> str:
        return self._sink.request_id

    @property
    def finished(self) -> bool:
        """The final output was received."""
        return self._final is not None

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._final is not None or self._closed:
            raise StopAsyncIteration
        try:
            output = await self._sink.queue.get()
        except asyncio.CancelledError:
            self._abandon()
            raise
        self._token_ids.extend(output.new_token_ids)
        self._text = output.text
        self._num_cached_tokens = max(self._num_cached_tokens, output.num_cached_tokens)
        self._logprobs.extend(output.new_logprobs)
        if output.prompt_logprobs is not None:
            self._prompt_logprobs = output.prompt_logprobs
        if output.finished:
            self._final = output
        return output

    async def result(self) -> Completion:
        """Read the rest of the stream and return the whole completion.

        Raises :class:`EngineDeadError` / :class:`ModelExecutionError` if the request failed;
        a cancelled request returns with ``finish_reason == "cancelled"``."""
        async for _ in self:
            pass
        final = self._final
        if final is None:  # closed early: the request was cancelled
            text, reason, stop_reason = self._text, FinishReason.CANCELLED.value, None
        else:
            if final.finish_reason == FinishReason.ERROR.value:
                error_type = ModelExecutionError if self._engine.is_alive else EngineDeadError
                raise error_type(final.error or "the request failed")
            text, reason, stop_reason = final.text, final.finish_reason or "stop", final.stop_reason
        return Completion(
            request_id=self.request_id,
            prompt_token_ids=self._prompt_token_ids,
            token_ids=self._token_ids,
            text=text,
            finish_reason=reason,
            logprobs=self._logprobs if isinstance(self._params, SamplingParams) and self._params.logprobs is not None
            else None,
            prompt_logprobs=self._prompt_logprobs,
            stop_reason=stop_reason,
            num_cached_tokens=self._num_cached_tokens,
        )

    async def embedding(self) -> EmbeddingOutput:
        """Read an embedding request's stream (its one output) and return the vector.

        Raises :class:`EngineDeadError` / :class:`ModelExecutionError` if the request failed,
        and :class:`RequestCancelledError` if it was cancelled (there is no partial vector)."""
        async for _ in self:
            pass
        final = self._final
        if final is not None and final.finish_reason == FinishReason.ERROR.value:
            error_type = ModelExecutionError if self._engine.is_alive else EngineDeadError
            raise error_type(final.error or "the request failed")
        if final is None or final.embedding is None:
            why = final.error if final is not None and final.error else "the request was cancelled"
            raise RequestCancelledError(why)
        return EmbeddingOutput(request_id=self.request_id, prompt_token_ids=self._prompt_token_ids,
                               embedding=final.embedding, num_cached_tokens=final.num_cached_tokens)

    async def cancel(self) -> bool:
        """Cancel the request; the stream still ends with its ``cancelled`` output."""
        return await self._engine.cancel(self.request_id)

    async def aclose(self) -> None:
        """Stop reading: cancels the request (and waits for that) unless it has finished."""
        if self._final is None and not self._closed:
            self._closed = True
            try:
                await self._engine.cancel(self.request_id)
            except RequestNotFoundError:  # forgotten already: nothing to cancel
                pass
        self._closed = True

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _abandon(self) -> None:
        """The consumer went away without awaiting: cancel without waiting for the answer."""
        if self._final is None and not self._closed:
            self._closed = True
            self._engine.cancel_nowait(self.request_id)

    def __del__(self) -> None:
        self._abandon()
