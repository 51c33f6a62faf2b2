"""``AsyncEngine``: the synchronous :class:`LLMEngine` behind an asyncio API (the server's engine).

A thin facade over three parts, one job each:

* :class:`~rocmforge.engine.engine_loop.EngineLoop` — the engine thread: the command queue,
  one step at a time, output delivery, and the failure policy (what marks the engine dead);
* :class:`~rocmforge.engine.status_board.StatusBoard` — the published request statuses, the
  queue positions, the scheduler's stats and the only finished-request history;
* :class:`~rocmforge.engine.stats.StatsCollector` — one
  :class:`~rocmforge.engine.stats.IterationStats` per round for the attached stats loggers.

Design choice: a **command queue, not a lock**. Every call into the ``LLMEngine`` happens on
the engine thread, so the scheduler stays single-threaded as it requires. ``submit`` and
``cancel`` wait at most one step for their answer (admission errors are raised by ``submit``
itself), and a cancel frees the request's KV blocks before the next step. ``status()`` is
synchronous and never blocks: it reads the status board. Torch releases the GIL inside its
kernels, so the event loop stays responsive while a step runs.

Consumers that go away cancel their request: ``RequestStream.aclose()`` (also the
``async with`` exit), cancelling the task that awaits the stream's next output, and the
stream being garbage collected before its final output.

The ``LLMEngine`` is not thread-safe: while an ``AsyncEngine`` runs, do not drive the same
engine from elsewhere (e.g. ``LLM.generate``).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from rocmforge.engine.async_commands import Call, Cancel, Command, Reply, Shutdown, Sink, Submit
from rocmforge.engine.engine_loop import SHUTDOWN_CANCEL_MESSAGE, EngineLoop
from rocmforge.engine.llm_engine import LLMEngine
from rocmforge.engine.request_status import RequestStatus
from rocmforge.engine.request_stream import RequestStream
from rocmforge.engine.scheduler import Scheduler, SchedulerStats
from rocmforge.engine.stats import StatsCollector, StatsLogger
from rocmforge.engine.status_board import FINISHED_HISTORY, StatusBoard
from rocmforge.errors import InvalidRequestError
from rocmforge.sampling_params import SamplingParams

if TYPE_CHECKING:
    from rocmforge.engine.model_runner import ModelRunner
    from rocmforge.llm import LLM
    from rocmforge.structured.compiler import GrammarStats
    from rocmforge.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

T = TypeVar("T")

MAX_REQUEST_ID_LENGTH = 256
SHUTDOWN_GRACE_S = 10.0
"""How long ``shutdown`` waits beyond its timeout for a step in progress to end."""

__all__ = ["MAX_REQUEST_ID_LENGTH", "SHUTDOWN_CANCEL_MESSAGE", "SHUTDOWN_GRACE_S", "AsyncEngine"]


class AsyncEngine:
    """Runs an :class:`LLMEngine` on one background thread and serves it to asyncio code."""

    def __init__(
        self,
        engine: LLMEngine,
        *,
        max_consecutive_failures: int = 3,
        finished_history: int = FINISHED_HISTORY,
        stats_loggers: Sequence[StatsLogger] = (),
    ) -> None:
        self._engine = engine
        self._board = StatusBoard(engine.scheduler, finished_history)
        self._stats = StatsCollector(tuple(stats_loggers), self._board.stats)
        self._loop = EngineLoop(engine, self._board, self._stats, max_consecutive_failures=max_consecutive_failures)

    @classmethod
    def from_llm(cls, llm: LLM, **kwargs: Any) -> AsyncEngine:
        """Serve the engine of a loaded :class:`~rocmforge.LLM` (do not call ``llm.generate``
        while this runs)."""
        return cls(llm.engine, **kwargs)

    @classmethod
    def from_parts(
        cls, runner: ModelRunner, tokenizer: Tokenizer, scheduler: Scheduler, **kwargs: Any
    ) -> AsyncEngine:
        return cls(LLMEngine(runner, tokenizer, scheduler), **kwargs)

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread (idempotent; the first command starts it too)."""
        self._loop.start()

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Stop admitting, let in-flight requests finish for up to ``timeout`` seconds, then
        cancel the rest and stop the thread. Idempotent."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        if self._loop.close_if_unstarted():  # never started: nothing runs, nothing to drain
            return
        if not self._loop.post(Shutdown(time.monotonic() + max(timeout, 0.0), Reply(loop, future))):
            return
        try:
            await asyncio.wait_for(asyncio.shield(future), max(timeout, 0.0) + SHUTDOWN_GRACE_S)
        except asyncio.TimeoutError:
            logger.error("the engine thread did not stop within %.1f s of the shutdown deadline", SHUTDOWN_GRACE_S)
            return
        thread = self._loop.thread
        if thread is not None:
            await asyncio.to_thread(thread.join, SHUTDOWN_GRACE_S)

    @property
    def is_alive(self) -> bool:
        """False once a fatal error killed the engine (a clean shutdown keeps it True)."""
        return self._loop.dead_reason is None

    @property
    def is_running(self) -> bool:
        """The thread is up and admitting requests."""
        thread = self._loop.thread
        return thread is not None and thread.is_alive() and self._loop.accepting and not self._loop.closed

    @property
    def dead_reason(self) -> str | None:
        return self._loop.dead_reason

    # --- requests --------------------------------------------------------------------------

    async def submit(
        self,
        prompt_token_ids: Sequence[int],
        params: Any,
        request_id: str | None = None,
    ) -> RequestStream:
        """Queue a request (``params``: a ``SamplingParams``, or a ``PoolingParams`` for an
        embedding request, whose stream has one output: ``RequestStream.embedding()``); return
        its stream of outputs.

        Raises the admission errors here (``InvalidRequestError``,
        ``ContextLengthExceededError``, ``OverloadedError``, ``EngineDeadError``), never later
        in the stream. Waits at most one engine step for the admission answer."""
        if request_id is None:
            request_id = uuid.uuid4().hex
        elif not isinstance(request_id, str) or not 0 < len(request_id) <= MAX_REQUEST_ID_LENGTH:
            raise InvalidRequestError(
                f"request_id must be a non-empty string of at most {MAX_REQUEST_ID_LENGTH} characters",
                param="request_id",
            )
        try:
            ids = self._engine.check_request(prompt_token_ids, params)
            structured = params.structured if isinstance(params, SamplingParams) else None
            # compiled on a worker thread: neither the event loop nor the engine thread waits
            grammar = (await asyncio.to_thread(self._engine.grammars.matcher, structured)
                       if structured is not None else None)
        except InvalidRequestError as exc:
            logger.debug("request %s refused: %s", request_id, exc, extra={"request_id": request_id})
            raise
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        sink = Sink(request_id, loop)
        self._post(Submit(request_id, ids, params, sink, Reply(loop, future), grammar))
        try:
            await future
        except asyncio.CancelledError:
            # The submitter went away: the request may have been admitted; nobody will read it.
            self.cancel_nowait(request_id)
            raise
        return RequestStream(self, sink, ids, params)

    async def cancel(self, request_id: str) -> bool:
        """Finish a request with ``cancelled`` and free its KV blocks before the next step.

        True if it was cancelled; False if it had already finished (idempotent). Unknown ids
        raise :class:`RequestNotFoundError`."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        if not self._loop.post(Cancel(request_id, Reply(loop, future))):
            self.status(request_id)  # the engine has stopped: known ids are finished
            return False
        return await future

    def cancel_nowait(self, request_id: str) -> None:
        """Cancel without waiting for the answer (a consumer that went away); unknown or
        finished ids are not an error."""
        self._loop.post(Cancel(request_id, None, quiet=True))

    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run ``fn(engine)`` on the engine thread between two steps and return its result.

        For rare inspection and maintenance (tests, prefix-cache reset); ``fn`` must be quick
        and must not keep references to engine state."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._post(Call(fn, Reply(loop, future)))
        return await future

    def status(self, request_id: str) -> RequestStatus:
        """The request's state as of the last step (live or recently finished; never blocks).

        Unknown (or long forgotten) ids raise :class:`RequestNotFoundError`."""
        return self._board.status(request_id)

    def _post(self, command: Command) -> None:
        """Queue a command; when the engine no longer runs, answer it at once."""
        if not self._loop.post(command):
            self._loop.reject(command)

    # --- stats (snapshots as of the last step) ---------------------------------------------

    def add_stats_logger(self, stats_logger: StatsLogger) -> None:
        """Hand every later round's :class:`IterationStats` to ``stats_logger`` too (before or
        after ``start``; counting begins with the next round)."""
        self._stats.add(stats_logger)

    def stats(self) -> SchedulerStats:
        return self._board.stats

    def grammar_stats(self) -> GrammarStats:
        """The structured-output compiler's counts (thread-safe)."""
        return self._engine.grammars.stats()

    @property
    def num_running(self) -> int:
        return self._board.stats.num_running

    @property
    def num_waiting(self) -> int:
        return self._board.stats.num_waiting

    @property
    def kv_cache_usage(self) -> float:
        return self._board.stats.kv_cache_usage

    @property
    def num_steps(self) -> int:
        return self._loop.num_steps

    @property
    def tokenizer(self) -> Tokenizer:
        return self._engine.tokenizer

    @property
    def device(self) -> str:
        """The model runner's device (``cpu``, ``cuda:0``)."""
        return str(self._engine.runner.device)

    @property
    def max_model_len(self) -> int:
        return self._engine.scheduler.max_model_len

    @property
    def max_waiting(self) -> int:
        """Capacity of the waiting queue; a submit beyond it raises ``OverloadedError``."""
        return self._engine.scheduler.scheduler_config.max_waiting

    @property
    def vocab_size(self) -> int:
        """Token ids ``[0, vocab_size)`` are accepted wherever ids are."""
        return self._engine.vocab_size

    @property
    def pooling(self) -> str | None:
        """What embedding requests pool with (``mean`` | ``cls`` | ``last``); None: the
        engine cannot embed unless a request names a pooling."""
        return self._engine.pooling

    @property
    def no_pooling_reason(self) -> str:
        """Why :attr:`pooling` is None (empty when it is not)."""
        return self._engine.no_pooling_reason if self._engine.pooling is None else ""

    @property
    def hidden_size(self) -> int:
        """Length of an embedding before ``dimensions`` truncates it."""
        return self._engine.runner.hidden_size
