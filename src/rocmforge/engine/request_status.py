"""A request's state as the async engine publishes it, and what its end yields.

Built on the engine thread from the scheduler's :class:`Request` (``snapshot``), read by
anyone (``AsyncEngine.status``, ``/status/{id}``). ``finished_stats`` turns a final status into
the stats the metrics observe; ``log_finished`` writes the one log line per ended request.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from rocmforge.engine.request import FinishReason, Request, RequestState
from rocmforge.engine.stats import FinishedRequestStats

logger = logging.getLogger("rocmforge.engine.async_engine")


@dataclass(frozen=True, slots=True)
class RequestStatus:
    """A request's state as of the engine's last step. Timestamps are ``time.monotonic()``."""

    request_id: str
    state: RequestState
    """``queued`` | ``prefill`` | ``decode`` | ``finished``."""
    finish_reason: str | None
    """``stop`` | ``length`` | ``cancelled`` | ``error`` once finished."""
    error: str | None
    queue_position: int | None
    """0-based place in the waiting queue while queued; ``None`` otherwise."""
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    """Prompt tokens served by the prefix cache at the last admission."""
    num_preemptions: int
    arrival_time: float
    first_scheduled_time: float | None
    first_token_time: float | None
    finished_time: float | None


def snapshot(request: Request, error: str | None = None) -> RequestStatus:
    return RequestStatus(
        request_id=request.request_id,
        state=request.state,
        finish_reason=request.finish_reason.value if request.finish_reason else None,
        error=error or request.error,
        queue_position=None,
        num_prompt_tokens=request.num_prompt_tokens,
        num_output_tokens=request.num_output_tokens,
        num_cached_tokens=request.num_cached_tokens,
        num_preemptions=request.num_preemptions,
        arrival_time=request.arrival_time,
        first_scheduled_time=request.first_scheduled_time,
        first_token_time=request.first_token_time,
        finished_time=request.finished_time,
    )


def finished_stats(status: RequestStatus) -> FinishedRequestStats:
    end = status.finished_time if status.finished_time is not None else time.monotonic()
    arrival, scheduled, first = status.arrival_time, status.first_scheduled_time, status.first_token_time
    return FinishedRequestStats(
        finish_reason=status.finish_reason or FinishReason.ERROR.value,
        num_prompt_tokens=status.num_prompt_tokens,
        num_output_tokens=status.num_output_tokens,
        num_cached_tokens=status.num_cached_tokens,
        num_preemptions=status.num_preemptions,
        e2e_s=end - arrival,
        queue_s=None if scheduled is None else scheduled - arrival,
        prefill_s=None if scheduled is None or first is None else first - scheduled,
        decode_s=None if first is None else end - first,
        ttft_s=None if first is None else first - arrival,
    )


def log_finished(status: RequestStatus) -> None:
    """One line per request that ended, for whatever reason, tagged with its id."""
    rid = status.request_id
    end = status.finished_time if status.finished_time is not None else time.monotonic()
    counts = (status.num_prompt_tokens, status.num_output_tokens, end - status.arrival_time)
    extra = {"request_id": rid}
    if status.finish_reason == FinishReason.ERROR.value:
        logger.warning("request %s failed after %d prompt + %d generated tokens (%.3f s): %s", rid, *counts,
                       status.error, extra=extra)
    elif status.finish_reason == FinishReason.CANCELLED.value:
        why = f": {status.error}" if status.error else ""
        logger.info("request %s cancelled after %d prompt + %d generated tokens (%.3f s)%s", rid, *counts, why,
                    extra=extra)
    else:
        logger.info("request %s finished (%s): %d prompt + %d generated tokens in %.3f s, %d cached, %d preemptions",
                    rid, status.finish_reason, *counts, status.num_cached_tokens, status.num_preemptions, extra=extra)
