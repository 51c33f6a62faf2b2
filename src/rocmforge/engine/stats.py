"""Engine statistics: plain dataclasses, and the protocol of whoever consumes them.

Flows in: the :class:`~rocmforge.engine.async_engine.AsyncEngine`'s engine thread fills one
:class:`IterationStats` per round of its loop (the commands it handled, then at most one
``step()``), with one :class:`FinishedRequestStats` per request that ended in it.
Flows out: to every :class:`StatsLogger` attached to the engine, on the engine thread,
before the round's outputs are delivered (:class:`StatsCollector` does both). Without a
logger nothing here is built.

This module knows nothing about Prometheus; :mod:`rocmforge.server.metrics` exports these.

Counting rules (none of them double counts a preempted and recomputed request):

* a prompt counts once, in the round that sampled the request's first token (prefix-cache
  hits included: those tokens were served, just not computed), or, an embedding request's, in
  the round that delivered its vector (then it counts in ``num_pooled_tokens`` too);
* a generated token counts in the round that delivered it; tokens are never re-emitted;
* preemptions and prefix-cache queries / hits are deltas of the scheduler's cumulative
  counters since the previous report.

Times are ``time.monotonic()`` differences in seconds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from rocmforge.engine.request import Request
    from rocmforge.engine.scheduler import SchedulerStats

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FinishedRequestStats:
    """One request's life, reported once when it finishes (for any reason)."""

    finish_reason: str
    """``stop`` | ``length`` | ``cancelled`` | ``error``."""
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    """Prompt tokens the prefix cache served at the last admission."""
    num_preemptions: int
    e2e_s: float
    """Arrival to finish."""
    queue_s: float | None
    """Arrival to first scheduled; ``None`` if it never left the queue."""
    prefill_s: float | None
    """First scheduled to first token (recompute after a preemption before the first
    token included); ``None`` without a first token."""
    decode_s: float | None
    """First token to finish; ``None`` without a first token."""
    ttft_s: float | None
    """Arrival to first token; ``None`` without a first token."""


@dataclass(slots=True)
class IterationStats:
    """What one round of the engine loop did (the counters are deltas, not totals)."""

    num_steps: int = 0
    """Engine steps that completed in this round: 0 or 1."""
    step_duration_s: float = 0.0
    """Wall time of the completed step (schedule, forward, sample, detokenize)."""
    num_prompt_tokens: int = 0
    """Prompt tokens of the requests that got their first token in this round."""
    num_generation_tokens: int = 0
    """Output tokens delivered in this round."""
    num_embeddings: int = 0
    """Embedding vectors delivered in this round (one per embedding request)."""
    num_pooled_tokens: int = 0
    """Prompt tokens of those embedding requests (pooled into their vectors)."""
    num_preemptions: int = 0
    prefix_cache_queries: int = 0
    """Tokens looked up in the prefix cache."""
    prefix_cache_hits: int = 0
    """Of those, tokens served from it."""
    time_to_first_tokens: list[float] = field(default_factory=list)
    """Arrival to first token, one entry per request that got its first token."""
    inter_token_latencies: list[float] = field(default_factory=list)
    """Gap between consecutive tokens of a request, one entry per token after its first."""
    finished_requests: list[FinishedRequestStats] = field(default_factory=list)

    def is_empty(self) -> bool:
        return not (
            self.num_steps
            or self.num_preemptions
            or self.prefix_cache_queries
            or self.finished_requests
        )


class StatsLogger(Protocol):
    """Receives the engine's statistics. Called on the engine thread after every round that
    did something: keep it quick (update counters, no I/O) and thread-safe for readers on
    other threads. An exception it raises is logged and otherwise ignored."""

    def record(self, stats: IterationStats) -> None: ...


class StatsCollector:
    """Fills one :class:`IterationStats` per round of the engine loop and hands it to the
    attached :class:`StatsLogger` objects (on the engine thread). Without a logger it builds
    nothing."""

    def __init__(self, loggers: tuple[StatsLogger, ...], scheduler_stats: SchedulerStats) -> None:
        self._loggers = loggers  # replaced, never mutated: the engine thread reads it without a lock
        self._iteration: IterationStats | None = None
        self._reported = scheduler_stats

    def add(self, stats_logger: StatsLogger) -> None:
        self._loggers = (*self._loggers, stats_logger)

    def collecting(self) -> IterationStats | None:
        """This round's stats being filled, or None when no logger wants them."""
        if not self._loggers:
            return None
        if self._iteration is None:
            self._iteration = IterationStats()
        return self._iteration

    def step_done(self, duration_s: float) -> None:
        iteration = self.collecting()
        if iteration is not None:
            iteration.num_steps += 1
            iteration.step_duration_s += duration_s

    def tokens(self, request: Request, num_tokens: int, now: float, last: float | None) -> None:
        """A step delivered ``num_tokens`` of ``request`` at ``now``; ``last``: when its
        previous tokens were delivered (None: these are its first)."""
        iteration = self.collecting()
        if iteration is None:
            return
        iteration.num_generation_tokens += num_tokens
        if last is None:  # its first token: the prompt is served (once, even if preempted later)
            iteration.num_prompt_tokens += request.num_prompt_tokens
            first = request.first_token_time if request.first_token_time is not None else now
            iteration.time_to_first_tokens.append(first - request.arrival_time)
        else:
            iteration.inter_token_latencies.append(now - last)

    def pooled(self, request: Request) -> None:
        """A step delivered the embedding of ``request``: its prompt is served."""
        iteration = self.collecting()
        if iteration is not None:
            iteration.num_embeddings += 1
            iteration.num_pooled_tokens += request.num_prompt_tokens
            iteration.num_prompt_tokens += request.num_prompt_tokens

    def finished(self, stats: FinishedRequestStats) -> None:
        iteration = self.collecting()
        if iteration is not None:
            iteration.finished_requests.append(stats)

    def report(self, scheduler_stats: SchedulerStats) -> None:
        """Hand this round's stats to the loggers (if it did anything) and start a new one."""
        last, self._reported = self._reported, scheduler_stats
        loggers = self._loggers
        if not loggers:
            return
        iteration, self._iteration = self._iteration or IterationStats(), None
        iteration.num_preemptions = scheduler_stats.num_preemptions - last.num_preemptions
        iteration.prefix_cache_queries = scheduler_stats.prefix_cache_queries - last.prefix_cache_queries
        iteration.prefix_cache_hits = scheduler_stats.prefix_cache_hits - last.prefix_cache_hits
        if iteration.is_empty():
            return
        for stats_logger in loggers:
            try:
                stats_logger.record(iteration)
            except Exception:  # metrics must not take the engine down
                logger.exception("stats logger %s failed", type(stats_logger).__name__)
