"""Continuous-batching scheduler: which requests run each step, how many tokens, which blocks.

The engine step is three calls::

    out = scheduler.schedule()          # SchedulerOutput: requests, token ranges, preemptions
    result = runner.execute(out)        # RunnerOutput: one sampled token per sampling request
    scheduler.update(out, result)       # advance, append, check stops, free finished blocks

An embedding request (``Request.is_pooling``) is scheduled like a prefill: its prompt in chunks
within the token budget, batched with everything else; the step that catches it up gets a
pooled vector from the runner instead of a token (``RunnerOutput.pooled``, opaque here), and
``update`` finishes it (``stop``), freeing its blocks. It takes prefix-cache hits only when its
pooling reads the last token alone (``Request.takes_prefix_hits``).

Flows in: :class:`Request` objects from the engine (``add_request``), cancellations and
stop-string hits (``finish_request``) and the runner's :class:`RunnerOutput`. Flows out:
:class:`SchedulerOutput` to the runner and, from ``update``, the requests that got tokens.
The scheduler owns every live request's state and the :class:`BlockManager`; it never
touches tensors. A finished request is forgotten at once: ``update`` (or ``finish_request``)
hands it back one last time, and only its id stays, until the next ``schedule()`` tells the
runner (``finished_request_ids``). Whoever wants a finished request's history keeps it (the
async engine's status board keeps small snapshots, never token lists). It is not
thread-safe: call it from the engine loop only.

Out-of-memory back-off. When a step runs out of device memory the engine calls
:meth:`Scheduler.shrink_after_oom`: the step limits (sequences and batched tokens) drop to
half of what the failed step held, and the latest admitted running requests beyond the new
sequence limit are preempted (recompute later). The lowered limits hold for
``oom_recovery_steps`` successful steps, then double back, step by step, up to the configured
ones.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from rocmforge.config import CacheConfig, SchedulerConfig
from rocmforge.engine.block_manager import BlockManager
from rocmforge.engine.request import FinishReason, Request, RequestState
from rocmforge.errors import (
    ConfigError,
    ContextLengthExceededError,
    InvalidRequestError,
    OverloadedError,
    RequestNotFoundError,
)
from rocmforge.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

OOM_RECOVERY_STEPS = 64
"""Successful steps after an out-of-memory back-off before the step limits double again."""


@dataclass(slots=True)
class ScheduledRequest:
    """One request's share of a step."""

    request: Request
    start_pos: int
    """``request.num_computed_tokens`` before this step: position of the first token."""
    num_tokens: int
    """Tokens to compute this step: ``all_token_ids[start_pos : start_pos + num_tokens]``."""
    samples: bool
    """After this step the request is caught up with all its tokens: sample one next token
    (an embedding request: pool its prompt instead)."""

    @property
    def token_ids(self) -> list[int]:
        return self.request.all_token_ids[self.start_pos : self.start_pos + self.num_tokens]


@dataclass(slots=True)
class SchedulerOutput:
    """What the runner computes this step."""

    scheduled: list[ScheduledRequest]
    """Order: as the runner should lay them out (running requests first, then admissions)."""
    preempted: list[Request]
    """Preempted during this ``schedule()``: blocks freed, back at the front of the queue."""
    num_batched_tokens: int
    finished_request_ids: list[str] = field(default_factory=list)
    """Requests that finished since the previous ``schedule()``: per-request state kept by
    the runner (if any) can be dropped."""


@dataclass(slots=True)
class RunnerOutput:
    """Produced by the model runner (defined here so the scheduler owns the contract)."""

    sampled: dict[str, int]
    """request id -> sampled token id, for every scheduled request with ``samples``."""
    logprobs: dict[str, Any] = field(default_factory=dict)
    """request id -> the sampled token's logprobs; opaque here, passed through to the engine."""
    prompt_logprobs: dict[str, tuple[int, list[Any]]] = field(default_factory=dict)
    """request id -> (start_pos of the chunk, logprobs of the prompt tokens it predicts);
    opaque here, passed through to the engine."""
    failed: dict[str, str] = field(default_factory=dict)
    """request id -> error message, for scheduled requests the runner could not compute
    (the others in the batch went on): ``update`` finishes them with ``error``."""
    pooled: dict[str, Any] = field(default_factory=dict)
    """request id -> the pooled embedding, for every scheduled embedding request with
    ``samples``; opaque here, passed through to the engine."""


@dataclass(frozen=True, slots=True)
class StepLimits:
    """How much one step may hold: at most ``max_num_seqs`` running requests and
    ``max_num_batched_tokens`` tokens (the configured limits, or lower after an OOM)."""

    max_num_seqs: int
    max_num_batched_tokens: int


@dataclass(slots=True)
class SchedulerStats:
    """A snapshot for metrics (plain numbers; exporting them is someone else's job)."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_preemptions: int
    prefix_cache_queries: int
    prefix_cache_hits: int


class Scheduler:
    """FCFS continuous batching with chunked prefill, prefix caching and recompute preemption."""

    def __init__(
        self,
        scheduler_config: SchedulerConfig,
        cache_config: CacheConfig,
        num_blocks: int,
        oom_recovery_steps: int = OOM_RECOVERY_STEPS,
    ) -> None:
        """``num_blocks``: the KV pool's size, which the model runner sized from the memory
        budget. ``scheduler_config.max_model_len`` must be resolved (placement sets it)."""
        if scheduler_config.max_model_len is None:
            raise ConfigError("scheduler_config.max_model_len must be resolved before building the scheduler")
        if num_blocks < 1:
            raise ConfigError(f"the KV pool needs at least one block, got {num_blocks}", param="num_blocks")
        self.scheduler_config = scheduler_config
        self.max_model_len: int = scheduler_config.max_model_len
        self.cache_config = cache_config
        self.block_manager = BlockManager(num_blocks, cache_config.block_size, cache_config.enable_prefix_caching)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order: the last one is preempted first
        self._live: dict[str, Request] = {}  # waiting + running
        self._finished_since_schedule: list[str] = []
        self.num_preemptions = 0
        self._oom_limits: StepLimits | None = None  # lowered after an out-of-memory step
        self._oom_recovery_steps = max(1, oom_recovery_steps)
        self._steps_since_oom = 0

    # --- requests in -------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a new request (FCFS). Raises on invalid, too long or duplicate requests,
        and ``OverloadedError`` when the waiting queue is full."""
        rid = request.request_id
        if rid in self._live:
            raise InvalidRequestError(f"request id {rid!r} is already in use", param="request_id")
        fresh = not (request.num_computed_tokens or request.block_ids)
        if request.state is not RequestState.QUEUED or not fresh:
            raise InvalidRequestError(f"request {rid!r} is not a new request")
        self.check_length(request.num_prompt_tokens, request.max_tokens)
        cfg = self.scheduler_config
        if len(self.waiting) >= cfg.max_waiting:
            raise OverloadedError(f"the waiting queue is full ({cfg.max_waiting} requests)")
        self._live[rid] = request
        self.waiting.append(request)

    def check_length(self, num_prompt_tokens: int, max_tokens: int, param: str = "max_tokens") -> None:
        """Raise unless a prompt of this length with this ``max_tokens`` (0: an embedding
        request) can ever run: it fits the context window and, at its peak, the whole KV
        pool. The errors name ``param``."""
        n = num_prompt_tokens
        if n == 0:
            raise InvalidRequestError("the prompt must not be empty", param="prompt")
        what = f"the prompt has {n} tokens" + (f" and max_tokens is {max_tokens}" if max_tokens else "")
        if n + max_tokens > self.max_model_len:
            raise ContextLengthExceededError(
                f"{what}: {n + max_tokens} tokens exceed the context window of {self.max_model_len}",
                param=param,
            )
        # The last sampled token is never fed back, so the K/V peak is n + max_tokens - 1
        # (an embedding request's: its n prompt tokens).
        peak = n + max(max_tokens, 1) - 1
        bm = self.block_manager
        if bm.blocks_needed(peak) > bm.num_blocks:
            capacity = bm.num_blocks * bm.block_size
            raise ContextLengthExceededError(
                f"{what}: {peak} tokens of KV cache exceed the whole pool of {capacity} tokens",
                param=param,
            )

    def finish_request(
        self, request_id: str, reason: FinishReason, error: str | None = None
    ) -> Request:
        """Finish a waiting or running request now (stop string, cancel, error), free its
        blocks and forget it; returns it. Ids that are not live (unknown, or finished
        already) raise ``RequestNotFoundError``."""
        request = self._live.get(request_id)
        if request is None:
            raise RequestNotFoundError(f"no live request with id {request_id!r}")
        if request.state is RequestState.QUEUED:
            self.waiting.remove(request)
        else:
            self.running.remove(request)
        self._finish(request, reason, error)
        return request

    # --- the step ------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Pick this step's work: running requests first, then FCFS admissions."""
        bm = self.block_manager
        limits = self.step_limits
        budget = limits.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[Request] = []

        # 1. Running requests, in admission order: decodes and unfinished (chunked) prefills.
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self._allocate_or_preempt(request, num_new, preempted):
                break  # it preempted itself: it was the last one
            scheduled.append(self._scheduled(request, num_new))
            budget -= num_new
            i += 1

        # 2. Admissions, FCFS with no skipping ahead; none in a step that had to preempt.
        while (
            not preempted
            and self.waiting
            and budget > 0
            and len(self.running) < limits.max_num_seqs
        ):
            request = self.waiting[0]
            # Prompt logprobs and mean / cls pooling need every prompt position computed.
            if request.takes_prefix_hits:
                hit_blocks, num_cached = bm.get_computed_blocks(request)
            else:
                hit_blocks, num_cached = [], 0
            # Chunked prefill: a prompt that does not fit in the budget gets a chunk.
            num_new = min(request.num_tokens - num_cached, budget)
            if not bm.allocate_slots(request, num_new, hit_blocks):
                break
            self.waiting.popleft()
            request.num_computed_tokens = num_cached
            request.num_cached_tokens = num_cached
            request.state = RequestState.PREFILL
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
            self.running.append(request)
            scheduled.append(self._scheduled(request, num_new))
            budget -= num_new

        finished_ids, self._finished_since_schedule = self._finished_since_schedule, []
        return SchedulerOutput(
            scheduled=scheduled,
            preempted=preempted,
            num_batched_tokens=limits.max_num_batched_tokens - budget,
            finished_request_ids=finished_ids,
        )

    def update(self, out: SchedulerOutput, result: RunnerOutput) -> list[Request]:
        """Apply the runner's result; return the requests that got a new token or, embedding
        requests, their pooled vector this step (finished ones included)."""
        bm = self.block_manager
        updated: list[Request] = []
        any_finished = False
        for item in out.scheduled:
            request = item.request
            if request.is_finished:  # finished (e.g. cancelled) after schedule()
                continue
            failure = result.failed.get(request.request_id)
            if failure is not None:  # its share of the step was not computed: do not advance
                self._finish(request, FinishReason.ERROR, failure)
                any_finished = True
                updated.append(request)
                continue
            request.num_computed_tokens += item.num_tokens
            bm.cache_full_blocks(request)
            if not item.samples:
                continue
            if request.is_pooling:
                pooled = request.request_id in result.pooled
                if not pooled:
                    logger.error("runner returned no embedding for request %s", request.request_id,
                                 extra={"request_id": request.request_id})
                self._finish(request, FinishReason.STOP if pooled else FinishReason.ERROR,
                             None if pooled else "the model runner returned no embedding")
                any_finished = True
                updated.append(request)
                continue
            token = result.sampled.get(request.request_id)
            if token is None:
                logger.error("runner returned no token for request %s", request.request_id,
                             extra={"request_id": request.request_id})
                self._finish(request, FinishReason.ERROR, "the model runner returned no token")
                any_finished = True
                updated.append(request)
                continue
            request.append_token(token)
            request.state = RequestState.DECODE
            if request.first_token_time is None:
                request.first_token_time = time.monotonic()
            reason = self._stop_reason(request, token)
            if reason is not None:
                self._finish(request, reason)
                any_finished = True
            updated.append(request)
        if any_finished:
            self.running = [r for r in self.running if not r.is_finished]
        self._recover_limits()
        return updated

    # --- out-of-memory back-off ------------------------------------------------------------

    @property
    def step_limits(self) -> StepLimits:
        """The limits the next ``schedule()`` obeys (lower than configured after an OOM)."""
        if self._oom_limits is not None:
            return self._oom_limits
        cfg = self.scheduler_config
        return StepLimits(cfg.max_num_seqs, cfg.max_num_batched_tokens)

    def shrink_after_oom(self, out: SchedulerOutput) -> list[Request] | None:
        """The step ``out`` ran out of device memory and nothing of it was applied: lower the
        step limits below what it held and preempt the latest admitted running requests
        beyond the new sequence limit (recompute later), so ``schedule()`` builds a smaller
        step. Returns the preempted requests; ``None`` (nothing changed) when the step cannot
        shrink: one request computing one token.

        Several requests: half of them (and half the tokens) at most. One request (a prefill
        chunk): half its tokens."""
        num_seqs, num_tokens = len(out.scheduled), out.num_batched_tokens
        if num_seqs <= 1 and num_tokens <= 1:
            return None
        current = self.step_limits
        max_tokens = max(1, num_tokens // 2)
        max_seqs = num_seqs // 2 if num_seqs > 1 else min(current.max_num_seqs, max_tokens)
        self._oom_limits = StepLimits(max_seqs, max_tokens)
        self._steps_since_oom = 0
        preempted: list[Request] = []
        while len(self.running) > max_seqs:
            victim = self.running.pop()  # admission order: the latest admitted goes first
            self._preempt(victim, "out of device memory")
            preempted.append(victim)
        return preempted

    def _recover_limits(self) -> None:
        """A step succeeded: after enough of them, double the lowered limits back."""
        if self._oom_limits is None:
            return
        self._steps_since_oom += 1
        if self._steps_since_oom < self._oom_recovery_steps:
            return
        self._steps_since_oom = 0
        cfg, low = self.scheduler_config, self._oom_limits
        raised = StepLimits(min(cfg.max_num_seqs, 2 * low.max_num_seqs),
                            min(cfg.max_num_batched_tokens, 2 * low.max_num_batched_tokens))
        full = raised == StepLimits(cfg.max_num_seqs, cfg.max_num_batched_tokens)
        self._oom_limits = None if full else raised
        logger.info("out-of-memory back-off: step limits raised to %d requests / %d tokens%s",
                    raised.max_num_seqs, raised.max_num_batched_tokens, " (the configured ones)" if full else "")

    # --- status ----------------------------------------------------------------------------------

    def get_request(self, request_id: str) -> Request:
        """A live (waiting or running) request; else ``RequestNotFoundError``."""
        request = self._live.get(request_id)
        if request is None:
            raise RequestNotFoundError(f"no live request with id {request_id!r}")
        return request

    def is_live(self, request_id: str) -> bool:
        return request_id in self._live

    def queue_position(self, request_id: str) -> int | None:
        """0-based place in the waiting queue; ``None`` while running."""
        request = self.get_request(request_id)
        if request.state is not RequestState.QUEUED:
            return None
        return self.waiting.index(request)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self._live)

    def get_stats(self) -> SchedulerStats:
        bm = self.block_manager
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_cache_usage=bm.usage,
            num_preemptions=self.num_preemptions,
            prefix_cache_queries=bm.prefix_cache_queries,
            prefix_cache_hits=bm.prefix_cache_hits,
        )

    # --- internals -----------------------------------------------------------------------------

    def _allocate_or_preempt(
        self, request: Request, num_new: int, preempted: list[Request]
    ) -> bool:
        """Allocate a running request's slots, preempting the latest admitted requests until
        they fit. The requests before it are already scheduled, so a victim never is one of
        them. False if the request had to preempt itself."""
        while not self.block_manager.allocate_slots(request, num_new):
            victim = self.running.pop()
            self._preempt(victim, "out of KV blocks")
            preempted.append(victim)
            if victim is request:
                return False
        return True

    @staticmethod
    def _scheduled(request: Request, num_new: int) -> ScheduledRequest:
        start = request.num_computed_tokens
        return ScheduledRequest(request, start, num_new, start + num_new == request.num_tokens)

    def _preempt(self, request: Request, why: str) -> None:
        """Recompute preemption: drop the K/V, keep the tokens, requeue at the front."""
        rid = request.request_id
        logger.debug("preempted request %s (%s): its %d tokens are recomputed later", rid, why,
                     request.num_tokens, extra={"request_id": rid})
        self.block_manager.free(request)
        request.num_computed_tokens = 0
        request.state = RequestState.QUEUED
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    @staticmethod
    def _stop_reason(request: Request, token: int) -> FinishReason | None:
        params = request.params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"request {request.request_id} samples no tokens")
        if request.num_output_tokens >= params.min_tokens and (
            (token in request.eos_token_ids and not params.ignore_eos)
            or token in params.stop_token_ids
        ):
            return FinishReason.STOP
        if request.num_output_tokens >= params.max_tokens:
            return FinishReason.LENGTH
        return None

    def _finish(self, request: Request, reason: FinishReason, error: str | None = None) -> None:
        """Mark finished, free the blocks and forget it; the caller removes it from
        waiting/running."""
        self.block_manager.free(request)
        request.state = RequestState.FINISHED
        request.finish_reason = reason
        request.error = error
        request.finished_time = time.monotonic()
        request.block_hashes = []  # only needed while it can still hit or fill the cache
        del self._live[request.request_id]
        self._finished_since_schedule.append(request.request_id)
