"""The engine thread: commands between steps, one step at a time, outputs to the streams, and
the failure policy that decides when the engine is dead.

Threads and ownership::

    asyncio event loop(s)                      engine thread ("rocmforge-engine")
    ─────────────────────                      ─────────────────────────────────────────────
    AsyncEngine.submit / cancel / call /       owns the LLMEngine: scheduler, block manager,
    shutdown ──▶ post(command) ──▶ deque +     model runner, detokenizers. Nothing else
                 Condition ─────────────────▶  touches them. Between two steps it handles
                                               every queued command, then runs one step().
    RequestStream (asyncio.Queue per request)
        ◀── loop.call_soon_threadsafe ───────  one callback per event loop per step, carrying
                                               every output of that step for that loop
    StatusBoard (AsyncEngine.status, metrics)
        ◀── snapshots ───────────────────────  replaced after every command batch and step

Order after each command batch and each step: publish the snapshots (and report the stats),
then deliver outputs, then answer commands, so whoever got an answer or an output reads a
status at least that new. With no work the thread sleeps on the condition; a command wakes it.

Failure policy — what marks the engine dead:

* a fatal :class:`~rocmforge.errors.RocmForgeError` (``is_fatal()``, e.g. ``EngineDeadError``
  raised by the model): dead at once;
* ``max_consecutive_failures`` steps in a row that raised. A step raises only when no request
  is to blame (:mod:`rocmforge.engine.recovery`: a bad request fails alone, and when every
  request of a step fails the runner's probe — a forward pass with no request — decides; it
  raises only if the device fails it too), or for an internal error of the engine's own code
  (the scheduler, the block manager's invariants). Each such step fails the requests of its
  batch; the next successful step resets the count;
* the loop itself crashing (a bug here): dead, every stream ends with an error.

Dead: every live stream gets an ``error`` final output, ``submit`` raises ``EngineDeadError``,
``status`` keeps working. At the shutdown deadline the requests still in flight end
``cancelled`` with :data:`SHUTDOWN_CANCEL_MESSAGE`. Streams whose event loop closed are
cancelled.

Logging: the engine thread logs on a request's behalf with ``extra={"request_id": rid}``:
admitted or refused (DEBUG), finished with its reason and token counts or cancelled (INFO),
failed (WARNING). Engine state changes (started, draining, dead, stopped) carry no request id.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from rocmforge.engine.async_commands import Call, Cancel, Command, Reply, Shutdown, Sink, Submit, deliver
from rocmforge.engine.llm_engine import LLMEngine
from rocmforge.engine.request import FinishReason, Request, RequestState
from rocmforge.engine.request_status import finished_stats, log_finished
from rocmforge.engine.stats import StatsCollector
from rocmforge.engine.status_board import StatusBoard
from rocmforge.errors import (
    ConfigError,
    EngineDeadError,
    ModelExecutionError,
    RequestNotFoundError,
    RocmForgeError,
)
from rocmforge.outputs import RequestOutput

logger = logging.getLogger("rocmforge.engine.async_engine")

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


class EngineLoop:
    """The engine thread's state and body. Constructed and started by the
    :class:`~rocmforge.engine.async_engine.AsyncEngine`; :meth:`post` is its only entry from
    other threads."""

    def __init__(
        self, engine: LLMEngine, board: StatusBoard, stats: StatsCollector, *, max_consecutive_failures: int
    ) -> None:
        if max_consecutive_failures < 1:
            raise ConfigError("max_consecutive_failures must be >= 1", param="max_consecutive_failures")
        self._engine = engine
        self._board = board
        self._stats = stats
        self._max_consecutive_failures = max_consecutive_failures

        # Shared with posting threads, guarded by _cond: the queue and the lifecycle flags.
        self._cond = threading.Condition()
        self._commands: deque[Command] = deque()
        self._thread: threading.Thread | None = None
        self.accepting = True
        """False once shutting down or dead."""
        self.closed = False
        """The thread has exited: commands are answered by the poster."""
        self.dead_reason: str | None = None

        # Engine-thread state.
        self._tracked: dict[str, _Tracked] = {}
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[Sink, RequestOutput]]] = {}
        self._deadline: float | None = None
        self._shutdown_replies: list[Reply] = []
        self._replies: list[tuple[Reply, bool, Any]] = []
        self._failures_in_a_row = 0
        self.num_steps = 0

    # --- any thread ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the thread (idempotent)."""
        with self._cond:
            if self._thread is not None:
                if self.closed:
                    raise EngineDeadError("the engine was shut down and cannot be restarted")
                return
            self._thread = threading.Thread(target=self._run, name="rocmforge-engine", daemon=True)
            self._thread.start()

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    def close_if_unstarted(self) -> bool:
        """Shut a loop whose thread never started (nothing to drain): True if it was one."""
        with self._cond:
            if self._thread is not None:
                return False
            self.accepting = False
            self.closed = True
            return True

    def post(self, command: Command) -> bool:
        """Queue a command and wake the thread (starting it on first use). False, nothing
        queued, once the thread has exited; a submit while not accepting is refused here."""
        with self._cond:
            if self.closed:
                return False
            if self._thread is None:
                self.start()
            if isinstance(command, Submit) and not self.accepting:
                command.reply.fail(self.refusal())
                return True
            if isinstance(command, Shutdown):
                self.accepting = False
            self._commands.append(command)
            self._cond.notify()
        return True

    def refusal(self) -> EngineDeadError:
        """Why a submit is refused once the engine stopped accepting."""
        if self.dead_reason is not None:
            return EngineDeadError(f"the engine is dead: {self.dead_reason}")
        return EngineDeadError("the engine is shutting down")

    def reject(self, command: Command) -> None:
        """Answer a command the thread will never handle."""
        if isinstance(command, (Submit, Call)):
            command.reply.fail(self.refusal())
        elif isinstance(command, Cancel) and command.reply is not None:
            if self._board.knows(command.request_id) or command.quiet:
                command.reply.ok(False)
            else:
                command.reply.fail(RequestNotFoundError(f"no request with id {command.request_id!r}"))
        elif isinstance(command, Shutdown) and command.reply is not None:
            command.reply.ok(None)

    # --- the thread -----------------------------------------------------------------------------

    def _run(self) -> None:
        engine = self._engine
        scheduler = engine.scheduler
        logger.info("engine started: %d KV blocks, at most %d running and %d waiting requests",
                    scheduler.block_manager.num_blocks, scheduler.scheduler_config.max_num_seqs,
                    scheduler.scheduler_config.max_waiting)
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
                if self.dead_reason is not None:
                    break
        except Exception as exc:  # a bug in this loop: nobody may be left waiting forever
            logger.exception("the engine loop crashed")
            self._die(f"engine loop crashed: {type(exc).__name__}: {exc}")
        finally:
            self._close()

    def _wait_for_work(self) -> list[Command]:
        with self._cond:
            # Sleep only when idle; while shutting down, go on to the drain check.
            while not self._commands and not self._engine.has_unfinished() and self._deadline is None:
                self._cond.wait()
            # Swap rather than copy-and-clear: a stream's __del__ may post re-entrantly.
            commands, self._commands = self._commands, deque()
        return list(commands)

    def _sync(self) -> None:
        self._board.publish(self._engine.scheduler, self._tracked)
        self._stats.report(self._board.stats)
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

    # --- commands -----------------------------------------------------------------------------

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
            self._handle_shutdown(command)

    def _handle_submit(self, command: Submit) -> None:
        rid = command.request_id
        if not self.accepting:
            self._answer_error(command.reply, self.refusal())
            return
        try:
            request = self._engine.add_request(rid, command.prompt_token_ids, command.params,
                                               grammar=command.grammar)
        except RocmForgeError as exc:
            logger.debug("request %s refused: %s", rid, exc, extra={"request_id": rid})
            self._answer_error(command.reply, exc)
            return
        except Exception as exc:  # not the request's fault: report as a server error
            logger.exception("add_request failed for %s", rid, extra={"request_id": rid})
            self._answer_error(command.reply, ModelExecutionError(f"could not queue the request: {exc}"))
            return
        self._tracked[rid] = _Tracked(command.sink, request)
        self._board.admitted(request)
        logger.debug("request %s admitted: %d prompt tokens, max_tokens %d, %d waiting", rid,
                     request.num_prompt_tokens, request.max_tokens, self._engine.scheduler.num_waiting,
                     extra={"request_id": rid})
        self._answer(command.reply, None)

    def _handle_cancel(self, command: Cancel) -> None:
        rid = command.request_id
        if rid in self._tracked:
            self._abort(rid, FinishReason.CANCELLED)  # _finalize logs it
            self._answer(command.reply, True)
        elif self._board.knows(rid) or command.quiet:
            self._answer(command.reply, False)  # finished already: cancelling is idempotent
        else:
            self._answer_error(command.reply, RequestNotFoundError(f"no request with id {rid!r}"))

    def _handle_shutdown(self, command: Shutdown) -> None:
        if self._deadline is None or command.deadline < self._deadline:
            self._deadline = command.deadline
        with self._cond:
            self.accepting = False
        if command.reply is not None:
            self._shutdown_replies.append(command.reply)
        logger.info("engine draining: admission closed, %d requests in flight get %.1f s",
                    len(self._tracked), max(0.0, self._deadline - time.monotonic()))

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

    # --- steps and the failure policy ---------------------------------------------------------

    def _step(self) -> None:
        start = time.monotonic()
        try:
            outputs = self._engine.step()
        except Exception as exc:
            self._step_failed(exc)
            return
        self._failures_in_a_row = 0
        self.num_steps += 1
        now = time.monotonic()
        self._stats.step_done(now - start)
        for output in outputs:
            tracked = self._tracked.get(output.request_id)
            if tracked is None:
                continue  # not one of ours
            tracked.text = output.text
            if output.new_token_ids:
                self._stats.tokens(tracked.request, len(output.new_token_ids), now, tracked.last_token_time)
                tracked.last_token_time = now
            elif output.embedding is not None:
                self._stats.pooled(tracked.request)
            self._send(tracked.sink, output)
            if output.finished:
                self._finalize(output.request_id)

    def _step_failed(self, exc: Exception) -> None:
        """A step raised: no request was to blame (module docstring). Fail its batch; die when
        it is fatal or has happened too often in a row."""
        if isinstance(exc, RocmForgeError) and exc.is_fatal():
            logger.exception("fatal engine error")
            self._die(f"{type(exc).__name__}: {exc}")
            return
        self._failures_in_a_row += 1
        logger.exception("engine step failed with no request to blame (%d in a row): failing the requests in "
                         "its batch", self._failures_in_a_row)
        if self._failures_in_a_row >= self._max_consecutive_failures:
            self._die(f"{self._failures_in_a_row} engine steps failed in a row; last: {type(exc).__name__}: {exc}")
            return
        # The running requests were the batch (a superset only when the token budget cut the
        # running list short); requests that finished inside the failed step lost their last
        # output: they are reported as failed too.
        for rid, tracked in list(self._tracked.items()):
            if tracked.request.state is not RequestState.QUEUED:
                self._abort(rid, FinishReason.ERROR, f"{type(exc).__name__}: {exc}")

    def _die(self, reason: str) -> None:
        """Mark the engine dead and end every live request with an error."""
        with self._cond:
            self.dead_reason = reason
            self.accepting = False
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

    # --- request endings and delivery ---------------------------------------------------------

    def _abort(self, rid: str, reason: FinishReason, error: str | None = None) -> None:
        """Finish a tracked request now (frees its KV blocks) and end its stream."""
        self._engine.abort(rid, reason, error)
        tracked = self._tracked[rid]
        request = tracked.request
        output = _final(rid, tracked.text, reason, error)
        output.num_prompt_tokens = request.num_prompt_tokens
        output.num_output_tokens = request.num_output_tokens
        self._send(tracked.sink, output)
        self._finalize(rid, reason, error)

    def _finalize(self, rid: str, reason: FinishReason | None = None, error: str | None = None) -> None:
        """The request's final output is sent: its status moves to the finished history."""
        tracked = self._tracked.pop(rid)
        status = self._board.finished(tracked.request, reason, error)
        self._stats.finished(finished_stats(status))
        log_finished(status)

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

    def _close(self) -> None:
        """The thread's last act: refuse further commands and answer the queued ones."""
        with self._cond:
            self.closed = True
            self.accepting = False
            commands, self._commands = self._commands, deque()
        try:
            self._board.publish(self._engine.scheduler, self._tracked)
        except Exception:  # best effort: the engine may be in a broken state
            logger.exception("could not publish the final snapshots")
        self._stats.report(self._board.stats)
        self._send_replies()
        for command in commands:
            self.reject(command)
        for reply in self._shutdown_replies:
            reply.ok(None)
        logger.info("engine thread stopped%s", f" (dead: {self.dead_reason})" if self.dead_reason else "")


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
