"""``AsyncEngine``: the synchronous :class:`LLMEngine` behind an asyncio API (the server's engine).

Threads and ownership::

    asyncio event loop(s)                      engine thread ("rocmforge-engine")
    ─────────────────────                      ─────────────────────────────────────────────
    submit() / cancel() / call() / shutdown()  owns the LLMEngine: scheduler, block manager,
        │                                      model runner, detokenizers. Nothing else
        └──▶ command deque + Condition ──────▶ touches them. Between two steps it handles
                                               every queued command, then runs one step().
    RequestStream (asyncio.Queue per request)
        ◀── loop.call_soon_threadsafe ───────  one callback per event loop per step, carrying
                                               every output of that step for that loop
    status() / stats() / num_running ...
        ◀── immutable snapshots ─────────────  replaced (never mutated) after every command
                                               batch and every step

Design choice: a **command queue, not a lock**. Every call into the ``LLMEngine`` happens on
the engine thread, so the scheduler stays single-threaded as it requires. Commands are
handled between steps: ``submit`` and ``cancel`` wait at most one step for their answer
(admission errors are raised by ``submit`` itself), and a cancel frees the request's KV
blocks before the next step. ``status()`` is synchronous and never blocks: it reads the
snapshots (one :class:`RequestStatus` per request, the queue positions, the scheduler
stats) that the engine thread publishes; reading a dict entry is atomic under the GIL.
After each command batch and each step the engine thread publishes the snapshots first,
then delivers outputs, then answers commands, so whoever got an answer or an output reads
a status at least that new.
When there is no work the thread sleeps on the condition (no busy spinning); a command
wakes it. Torch releases the GIL inside its kernels, so the event loop stays responsive
while a step runs.

Statistics: stats loggers (:class:`~rocmforge.engine.stats.StatsLogger`, given to the
constructor or to ``add_stats_logger``) get one :class:`~rocmforge.engine.stats.IterationStats`
per round of the engine loop, on the engine thread, after the snapshots are published and
before the outputs are delivered. Without a logger the only bookkeeping is one timestamp per
delivered output.

Failure handling:

* ``step()`` raises (a model error, out of memory or transient device errors that its
  bounded retries did not cure: :mod:`rocmforge.engine.recovery`; a bug in one step): the
  requests that were in the step's batch — the running requests — are finished with
  ``error`` (their streams get a final output with ``error`` text), the exception is logged,
  and the engine keeps serving the waiting ones. ``max_consecutive_failures`` failed steps in
  a row mean the device is broken: the engine is marked dead. (A batch that fails is first
  re-run request by request by the model runner, which fails only the requests that fail
  alone; ``step()`` raises only when they all do, or the batch held one request.)
* Requests still in flight at the shutdown deadline end ``cancelled`` with
  :data:`SHUTDOWN_CANCEL_MESSAGE` as their ``error`` text.
* A :class:`~rocmforge.errors.RocmForgeError` whose ``is_fatal()`` is true marks the engine
  dead at once: every live stream gets an ``error`` final output, ``submit`` raises
  :class:`~rocmforge.errors.EngineDeadError` from then on, ``status`` keeps working.

Logging: the engine thread logs on a request's behalf with ``extra={"request_id": rid}`` (the
HTTP request context does not cross into the thread): admitted or refused (DEBUG), finished
with its reason and token counts or cancelled (INFO), failed (WARNING). Engine state changes
(started, draining, dead, stopped) carry no request id.

Consumers that go away cancel their request: ``RequestStream.aclose()`` (also the
``async with`` exit), cancelling the task that awaits the stream's next output, and the
stream being garbage collected before its final output.

Companions: the command messages and output sinks are in :mod:`~rocmforge.engine.async_commands`,
the per-request stream in :mod:`~rocmforge.engine.request_stream`, the published status
snapshots in :mod:`~rocmforge.engine.request_status`.

The ``LLMEngine`` is not thread-safe: while an ``AsyncEngine`` runs, do not drive the same
engine from elsewhere (e.g. ``LLM.generate``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar

from rocmforge.engine.async_commands import Call, Cancel, Command, Reply, Shutdown, Sink, Submit, deliver
from rocmforge.engine.llm_engine import LLMEngine
from rocmforge.engine.request_status import RequestStatus, finished_stats, log_finished, snapshot
from rocmforge.engine.request_stream import RequestStream
from rocmforge.engine.request import FinishReason, Request, RequestState
from rocmforge.engine.scheduler import FINISHED_HISTORY, Scheduler, SchedulerStats
from rocmforge.engine.stats import IterationStats, StatsLogger
from rocmforge.errors import (
    ConfigError,
    EngineDeadError,
    InvalidRequestError,
    ModelExecutionError,
    RequestNotFoundError,
    RocmForgeError,
)
from rocmforge.outputs import RequestOutput
from rocmforge.sampling_params import SamplingParams

if TYPE_CHECKING:
    from rocmforge.engine.model_runner import ModelRunner
    from rocmforge.llm import LLM
    from rocmforge.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

T = TypeVar("T")

MAX_REQUEST_ID_LENGTH = 256
SHUTDOWN_GRACE_S = 10.0
"""How long ``shutdown`` waits beyond its timeout for a step in progress to end."""
SHUTDOWN_CANCEL_MESSAGE = "cancelled: the server is shutting down (shutdown timeout reached)"
"""The ``error`` text of requests still in flight at the shutdown deadline."""


@dataclass(slots=True)
class _Tracked:
    """Engine-thread bookkeeping of a request whose stream has not had its final output."""

    sink: Sink
    request: Request
    text: str = ""
    last_token_time: float | None = None
    """When the engine thread last delivered a token of it (for inter-token latencies)."""


# --- the engine -------------------------------------------------------------------------------


class AsyncEngine:
    """Runs an :class:`LLMEngine` on one background thread and serves it to asyncio code.

    Owns the engine thread, the command queue and the published snapshots; the wrapped
    ``LLMEngine`` is touched by the engine thread only (see the module docstring)."""

    def __init__(
        self,
        engine: LLMEngine,
        *,
        max_consecutive_failures: int = 3,
        finished_history: int = FINISHED_HISTORY,
        stats_loggers: Sequence[StatsLogger] = (),
    ) -> None:
        if max_consecutive_failures < 1 or finished_history < 1:
            raise ConfigError("max_consecutive_failures and finished_history must be >= 1")
        self._engine = engine
        self._vocab_size: int = engine.runner.model.config.vocab_size
        self._max_consecutive_failures = max_consecutive_failures
        self._finished_history = finished_history

        # Shared state, guarded by _cond: the command queue and the lifecycle flags.
        self._cond = threading.Condition()
        self._commands: deque[Command] = deque()
        self._thread: threading.Thread | None = None
        self._accepting = True  # False once shutting down or dead
        self._closed = False  # the thread has exited: commands are answered here
        self._dead: str | None = None  # why the engine died

        # Engine-thread state (only the engine thread reads or writes these).
        self._tracked: dict[str, _Tracked] = {}
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[Sink, RequestOutput]]] = {}
        self._prev_running: set[str] = set()
        self._deadline: float | None = None
        self._shutdown_replies: list[Reply] = []
        self._replies: list[tuple[Reply, bool, Any]] = []  # answers sent by _sync()
        self._failures_in_a_row = 0

        # Snapshots: written by the engine thread (replaced, never mutated in place except
        # for single-key dict writes), read by anyone.
        self._live_status: dict[str, RequestStatus] = {}
        self._finished_status: OrderedDict[str, RequestStatus] = OrderedDict()
        self._positions: dict[str, int] = {}
        self._stats: SchedulerStats = engine.scheduler.get_stats()
        self._num_steps = 0

        # Statistics for the attached loggers (see rocmforge.engine.stats). The tuple is
        # replaced, never mutated, so the engine thread reads it without the lock.
        self._stats_loggers: tuple[StatsLogger, ...] = tuple(stats_loggers)
        self._iteration: IterationStats | None = None  # this round's, while loggers exist
        self._reported: SchedulerStats = self._stats  # cumulative counters at the last report

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
        with self._cond:
            if self._thread is not None:
                if self._closed:
                    raise EngineDeadError("the engine was shut down and cannot be restarted")
                return
            self._thread = threading.Thread(target=self._run, name="rocmforge-engine", daemon=True)
            self._thread.start()

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Stop admitting, let in-flight requests finish for up to ``timeout`` seconds, then
        cancel the rest and stop the thread. Idempotent."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._cond:
            self._accepting = False
            if self._thread is None:
                self._closed = True
            if self._closed:
                return
            self._commands.append(Shutdown(time.monotonic() + max(timeout, 0.0), Reply(loop, future)))
            self._cond.notify()
        try:
            await asyncio.wait_for(asyncio.shield(future), max(timeout, 0.0) + SHUTDOWN_GRACE_S)
        except asyncio.TimeoutError:
            logger.error("the engine thread did not stop within %.1f s of the shutdown deadline", SHUTDOWN_GRACE_S)
            return
        thread = self._thread
        if thread is not None:
            await asyncio.to_thread(thread.join, SHUTDOWN_GRACE_S)

    @property
    def is_alive(self) -> bool:
        """False once a fatal error killed the engine (a clean shutdown keeps it True)."""
        return self._dead is None

    @property
    def is_running(self) -> bool:
        """The thread is up and admitting requests."""
        thread = self._thread
        return thread is not None and thread.is_alive() and self._accepting and not self._closed

    @property
    def dead_reason(self) -> str | None:
        return self._dead

    # --- requests --------------------------------------------------------------------------

    async def submit(
        self,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        request_id: str | None = None,
    ) -> RequestStream:
        """Queue a request; return its stream of outputs.

        Raises the admission errors here (``InvalidRequestError``,
        ``ContextLengthExceededError``, ``OverloadedError``, ``EngineDeadError``), never later
        in the stream. Waits at most one engine step for the admission answer."""
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("params must be a SamplingParams", param="params")
        ids = _check_prompt(prompt_token_ids, self._vocab_size)
        if request_id is None:
            request_id = uuid.uuid4().hex
        elif not isinstance(request_id, str) or not 0 < len(request_id) <= MAX_REQUEST_ID_LENGTH:
            raise InvalidRequestError(
                f"request_id must be a non-empty string of at most {MAX_REQUEST_ID_LENGTH} characters",
                param="request_id",
            )
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        sink = Sink(request_id, loop)
        self._post(Submit(request_id, ids, params, sink, Reply(loop, future)))
        try:
            await future
        except asyncio.CancelledError:
            # The submitter went away: the request may have been admitted; nobody will read it.
            self._post_nowait(Cancel(request_id, None, quiet=True))
            raise
        return RequestStream(self, sink, ids, params)

    async def cancel(self, request_id: str) -> bool:
        """Finish a request with ``cancelled`` and free its KV blocks before the next step.

        True if it was cancelled; False if it had already finished (idempotent). Unknown ids
        raise :class:`RequestNotFoundError`."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        if not self._post_nowait(Cancel(request_id, Reply(loop, future))):
            self.status(request_id)  # the engine has stopped: known ids are finished
            return False
        return await future

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
        status = self._live_status.get(request_id) or self._finished_status.get(request_id)
        if status is None:
            raise RequestNotFoundError(f"no request with id {request_id!r}")
        if status.state is RequestState.QUEUED:
            status = replace(status, queue_position=self._positions.get(request_id))
        return status

    # --- stats (snapshots as of the last step) ---------------------------------------------

    def add_stats_logger(self, stats_logger: StatsLogger) -> None:
        """Hand every later round's :class:`IterationStats` to ``stats_logger`` too (before or
        after ``start``; counting begins with the next round)."""
        with self._cond:
            self._stats_loggers = (*self._stats_loggers, stats_logger)

    def stats(self) -> SchedulerStats:
        return self._stats

    @property
    def num_running(self) -> int:
        return self._stats.num_running

    @property
    def num_waiting(self) -> int:
        return self._stats.num_waiting

    @property
    def kv_cache_usage(self) -> float:
        return self._stats.kv_cache_usage

    @property
    def num_steps(self) -> int:
        return self._num_steps

    @property
    def tokenizer(self) -> Tokenizer:
        return self._engine.tokenizer

    @property
    def device(self) -> str:
        """The model runner's device (``cpu``, ``cuda:0``)."""
        return str(self._engine.runner.device)

    @property
    def max_model_len(self) -> int:
        return self._engine.scheduler.scheduler_config.max_model_len

    @property
    def max_waiting(self) -> int:
        """Capacity of the waiting queue; a submit beyond it raises ``OverloadedError``."""
        return self._engine.scheduler.scheduler_config.max_waiting

    # --- posting commands (any thread) ------------------------------------------------------

    def _post(self, command: Command) -> None:
        """Queue a command; when the engine no longer runs, answer it at once."""
        if not self._post_nowait(command):
            self._reject(command)

    def _post_nowait(self, command: Command) -> bool:
        """Queue a command and wake the thread (starting it on first use); False (nothing
        queued) once the thread exited."""
        with self._cond:
            if self._closed:
                return False
            if self._thread is None:
                self.start()
            if isinstance(command, Submit) and not self._accepting:
                command.reply.fail(self._not_accepting())
                return True
            self._commands.append(command)
            self._cond.notify()
        return True

    def _not_accepting(self) -> EngineDeadError:
        if self._dead is not None:
            return EngineDeadError(f"the engine is dead: {self._dead}")
        return EngineDeadError("the engine is shutting down")

    def _reject(self, command: Command) -> None:
        """Answer a command the engine thread will never handle."""
        if isinstance(command, (Submit, Call)):
            command.reply.fail(self._not_accepting())
        elif isinstance(command, Cancel) and command.reply is not None:
            known = command.request_id in self._finished_status or command.request_id in self._live_status
            if known or command.quiet:
                command.reply.ok(False)
            else:
                command.reply.fail(RequestNotFoundError(f"no request with id {command.request_id!r}"))
        elif isinstance(command, Shutdown) and command.reply is not None:
            command.reply.ok(None)

    # --- the engine thread ----------------------------------------------------------------------

    def _run(self) -> None:
        engine = self._engine
        # Logged here, on the engine thread: the caller's (a request's) log context stays out.
        logger.info("engine started: %d KV blocks, at most %d running and %d waiting requests",
                    engine.scheduler.block_manager.num_blocks, engine.scheduler.scheduler_config.max_num_seqs,
                    self.max_waiting)
        try:
            while True:
                for command in self._wait_for_work():
                    self._handle(command)
                self._sync()
                if self._deadline is not None and self._drain_done():
                    break
                if engine.has_unfinished():
                    self._step()
                    self._sync()
                if self._dead is not None:
                    break
        except Exception as exc:  # a bug in this loop: nobody may be left waiting forever
            logger.exception("the engine loop crashed")
            self._die(f"engine loop crashed: {type(exc).__name__}: {exc}")
        finally:
            self._close()

    def _sync(self) -> None:
        """Publish the snapshots (and report the stats), then deliver outputs, then answer
        commands: whoever gets an answer or an output sees a status and metrics at least as
        new."""
        self._publish()
        self._report_stats()
        self._flush()
        self._send_replies()

    def _send_replies(self) -> None:
        replies, self._replies = self._replies, []
        for reply, ok, value in replies:
            if ok:
                reply.ok(value)
            else:
                reply.fail(value)

    def _answer(self, reply: Reply | None, value: Any) -> None:
        if reply is not None:
            self._replies.append((reply, True, value))

    def _answer_error(self, reply: Reply | None, exc: BaseException) -> None:
        if reply is not None:
            self._replies.append((reply, False, exc))

    def _wait_for_work(self) -> list[Command]:
        with self._cond:
            # Sleep only when idle; while shutting down, go on to the drain check.
            while not self._commands and not self._engine.has_unfinished() and self._deadline is None:
                self._cond.wait()
            # Swap rather than copy-and-clear: a stream's __del__ may post re-entrantly.
            commands, self._commands = self._commands, deque()
        return list(commands)

    def _handle(self, command: Command) -> None:
        if isinstance(command, Submit):
            self._handle_submit(command)
        elif isinstance(command, Cancel):
            self._handle_cancel(command)
        elif isinstance(command, Call):
            try:
                self._answer(command.reply, command.fn(self._engine))
            except Exception as exc:  # handed back to the caller
                self._answer_error(command.reply, exc)
        else:
            if self._deadline is None or command.deadline < self._deadline:
                self._deadline = command.deadline
            with self._cond:
                self._accepting = False
            if command.reply is not None:
                self._shutdown_replies.append(command.reply)
            logger.info("engine draining: admission closed, %d requests in flight get %.1f s",
                        len(self._tracked), max(0.0, self._deadline - time.monotonic()))

    def _handle_submit(self, command: Submit) -> None:
        rid = command.request_id
        if not self._accepting:
            self._answer_error(command.reply, self._not_accepting())
            return
        try:
            request = self._engine.add_request(rid, command.prompt_token_ids, command.params)
        except RocmForgeError as exc:
            logger.debug("request %s refused: %s", rid, exc, extra={"request_id": rid})
            self._answer_error(command.reply, exc)
            return
        except Exception as exc:  # not the request's fault: report as a server error
            logger.exception("add_request failed for %s", rid, extra={"request_id": rid})
            self._answer_error(command.reply, ModelExecutionError(f"could not queue the request: {exc}"))
            return
        self._tracked[rid] = _Tracked(command.sink, request)
        self._finished_status.pop(rid, None)  # a finished id may be reused
        self._live_status[rid] = snapshot(request)
        logger.debug("request %s admitted: %d prompt tokens, max_tokens %d, %d waiting", rid,
                     request.num_prompt_tokens, request.params.max_tokens, self._engine.scheduler.num_waiting,
                     extra={"request_id": rid})
        self._answer(command.reply, None)

    def _handle_cancel(self, command: Cancel) -> None:
        rid = command.request_id
        try:
            request = self._engine.scheduler.get_request(rid)
        except RequestNotFoundError as exc:
            if command.quiet:
                self._answer(command.reply, False)
            else:
                self._answer_error(command.reply, exc)
            return
        cancelled = not request.is_finished
        if cancelled:
            self._abort(rid, FinishReason.CANCELLED)  # _finalize logs it
        self._answer(command.reply, cancelled)

    def _drain_done(self) -> bool:
        """While shutting down: True when nothing is left or the deadline passed (then the
        rest is cancelled)."""
        if not self._engine.has_unfinished():
            return True
        if self._deadline is None or time.monotonic() < self._deadline:
            return False
        logger.warning("shutdown deadline reached: cancelling %d requests", len(self._tracked))
        for rid in list(self._tracked):
            self._abort(rid, FinishReason.CANCELLED, SHUTDOWN_CANCEL_MESSAGE)
        self._sync()
        return True

    def _step(self) -> None:
        start = time.monotonic()
        try:
            outputs = self._engine.step()
        except Exception as exc:
            if isinstance(exc, RocmForgeError) and exc.is_fatal():
                logger.exception("fatal engine error")
                self._die(f"{type(exc).__name__}: {exc}")
                return
            self._failures_in_a_row += 1
            logger.exception(
                "engine step failed (%d in a row): failing the requests in its batch", self._failures_in_a_row
            )
            if self._failures_in_a_row >= self._max_consecutive_failures:
                self._die(f"{self._failures_in_a_row} engine steps failed in a row; last: {type(exc).__name__}: {exc}")
                return
            self._fail_batch(f"{type(exc).__name__}: {exc}")
            return
        self._failures_in_a_row = 0
        self._num_steps += 1
        now = time.monotonic()
        iteration = self._collecting()
        if iteration is not None:
            iteration.num_steps += 1
            iteration.step_duration_s += now - start
        for output in outputs:
            tracked = self._tracked.get(output.request_id)
            if tracked is None:
                continue  # not one of ours
            tracked.text = output.text
            if output.new_token_ids:
                _count_tokens(iteration, tracked, len(output.new_token_ids), now)
            self._send(tracked.sink, output)
            if output.finished:
                self._finalize(output.request_id)

    def _fail_batch(self, error: str) -> None:
        """After a failed step: the running requests were its batch (a superset only when the
        token budget cut the running list short). Requests that finished inside the failed
        step lost their last output: they are reported as failed too."""
        scheduler = self._engine.scheduler
        for rid in list(self._tracked):
            state = scheduler.get_request(rid).state
            if state is not RequestState.QUEUED:
                self._abort(rid, FinishReason.ERROR, error)

    def _die(self, reason: str) -> None:
        """Mark the engine dead and end every live request with an error."""
        with self._cond:
            self._dead = reason
            self._accepting = False
        logger.error("engine dead: %s (failing %d requests in flight)", reason, len(self._tracked))
        error = f"the engine died: {reason}"
        for rid in list(self._tracked):
            try:
                self._abort(rid, FinishReason.ERROR, error)
            except Exception:  # the engine state may be broken: still end the stream
                logger.exception("could not abort %s", rid, extra={"request_id": rid})
                tracked = self._tracked.pop(rid)
                self._send(tracked.sink, _final(rid, tracked.text, FinishReason.ERROR, error))
        self._flush()

    def _abort(self, rid: str, reason: FinishReason, error: str | None = None) -> None:
        """Finish a live request now (frees its KV blocks) and end its stream."""
        self._engine.abort(rid, reason)
        request = self._engine.scheduler.get_request(rid)
        tracked = self._tracked.get(rid)
        if tracked is not None:
            output = _final(rid, tracked.text, reason, error)
            output.num_prompt_tokens = request.num_prompt_tokens
            output.num_output_tokens = request.num_output_tokens
            self._send(tracked.sink, output)
        self._finalize(rid, reason, error)

    def _finalize(self, rid: str, reason: FinishReason | None = None, error: str | None = None) -> None:
        """The request's final output is sent: move its status to the finished history.
        ``reason`` overrides the scheduler's when they differ (a request that finished inside
        a failed step is reported as failed, as its stream saw)."""
        self._tracked.pop(rid, None)
        status = snapshot(self._engine.scheduler.get_request(rid), error)
        if reason is not None and status.finish_reason != reason.value:
            status = replace(status, finish_reason=reason.value)
        self._finished_status[rid] = status
        self._finished_status.move_to_end(rid)
        iteration = self._collecting()
        if iteration is not None:
            iteration.finished_requests.append(finished_stats(status))
        log_finished(status)
        self._live_status.pop(rid, None)
        if len(self._finished_status) > self._finished_history:
            self._finished_status.popitem(last=False)

    def _send(self, sink: Sink, output: RequestOutput) -> None:
        self._outbox.setdefault(sink.loop, []).append((sink, output))

    def _flush(self) -> None:
        """Deliver the queued outputs: one callback per event loop. Streams whose loop is
        closed have no reader left: their requests are cancelled."""
        while self._outbox:
            outbox, self._outbox = self._outbox, {}
            orphans: list[str] = []
            for loop, items in outbox.items():
                try:
                    loop.call_soon_threadsafe(deliver, items)
                except RuntimeError:
                    orphans.extend(sink.request_id for sink, out in items if not out.finished)
            for rid in orphans:
                if rid in self._tracked:
                    logger.info("event loop of request %s is closed: cancelling it", rid, extra={"request_id": rid})
                    self._abort(rid, FinishReason.CANCELLED)

    def _publish(self) -> None:
        """Refresh the snapshots: running requests, those that left ``running`` since the
        last publish (preempted), queue positions and scheduler stats."""
        scheduler = self._engine.scheduler
        running: set[str] = set()
        for request in scheduler.running:
            rid = request.request_id
            running.add(rid)
            if rid in self._tracked:
                self._live_status[rid] = snapshot(request)
        for rid in self._prev_running - running:
            if rid in self._tracked:
                self._live_status[rid] = snapshot(scheduler.get_request(rid))
        self._prev_running = running
        self._positions = {r.request_id: i for i, r in enumerate(scheduler.waiting)} if scheduler.waiting else {}
        self._stats = scheduler.get_stats()

    def _collecting(self) -> IterationStats | None:
        """This round's stats being filled, or None when no logger wants them."""
        if not self._stats_loggers:
            return None
        if self._iteration is None:
            self._iteration = IterationStats()
        return self._iteration

    def _report_stats(self) -> None:
        """Hand this round's stats to the loggers (if it did anything) and start a new one."""
        stats, last = self._stats, self._reported
        self._reported = stats
        loggers = self._stats_loggers
        if not loggers:
            return
        iteration, self._iteration = self._iteration or IterationStats(), None
        iteration.num_preemptions = stats.num_preemptions - last.num_preemptions
        iteration.prefix_cache_queries = stats.prefix_cache_queries - last.prefix_cache_queries
        iteration.prefix_cache_hits = stats.prefix_cache_hits - last.prefix_cache_hits
        if iteration.is_empty():
            return
        for stats_logger in loggers:
            try:
                stats_logger.record(iteration)
            except Exception:  # metrics must not take the engine down
                logger.exception("stats logger %s failed", type(stats_logger).__name__)

    def _close(self) -> None:
        """The thread's last act: refuse further commands and answer the queued ones."""
        with self._cond:
            self._closed = True
            self._accepting = False
            commands, self._commands = self._commands, deque()
        self._publish_stopped()
        self._report_stats()
        self._send_replies()
        for command in commands:
            self._reject(command)
        for reply in self._shutdown_replies:
            reply.ok(None)
        logger.info("engine thread stopped%s", f" (dead: {self._dead})" if self._dead else "")

    def _publish_stopped(self) -> None:
        try:
            self._publish()
        except Exception:  # best effort: the engine may be in a broken state
            logger.exception("could not publish the final snapshots")


# --- the stream ---------------------------------------------------------------------------------


# --- helpers ---------------------------------------------------------------------------------------


def _final(rid: str, text: str, reason: FinishReason, error: str | None) -> RequestOutput:
    """The last output of a request the engine ended (cancel, error): no new tokens."""
    return RequestOutput(
        request_id=rid,
        new_token_ids=[],
        delta_text="",
        text=text,
        finished=True,
        finish_reason=reason.value,
        error=error,
    )


def _count_tokens(iteration: IterationStats | None, tracked: _Tracked, num_tokens: int, now: float) -> None:
    """A step delivered ``num_tokens`` of a request at ``now``."""
    last, tracked.last_token_time = tracked.last_token_time, now
    if iteration is None:
        return
    iteration.num_generation_tokens += num_tokens
    if last is None:  # its first token: the prompt is served (once, even if preempted later)
        request = tracked.request
        iteration.num_prompt_tokens += request.num_prompt_tokens
        first = request.first_token_time if request.first_token_time is not None else now
        iteration.time_to_first_tokens.append(first - request.arrival_time)
    else:
        iteration.inter_token_latencies.append(now - last)


def _check_prompt(prompt_token_ids: Sequence[int], vocab_size: int) -> list[int]:
    """A copy of the prompt as a list of ints in ``[0, vocab_size)`` (an id out of range
    would crash the embedding lookup on the device)."""
    if isinstance(prompt_token_ids, (str, bytes)) or not isinstance(prompt_token_ids, Sequence):
        raise InvalidRequestError("the prompt must be a list of token ids", param="prompt")
    ids = list(prompt_token_ids)
    for token in ids:
        if not isinstance(token, int) or isinstance(token, bool):
            raise InvalidRequestError("the prompt must be a list of token ids", param="prompt")
        if not 0 <= token < vocab_size:
            raise InvalidRequestError(
                f"token id {token} is outside the vocabulary [0, {vocab_size})", param="prompt"
            )
    return ids
