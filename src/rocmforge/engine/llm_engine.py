"""The synchronous engine core: one ``step()`` = schedule, execute, update, detokenize.

In: requests (token ids + sampling parameters) through :meth:`LLMEngine.add_request`.
Out: :class:`~rocmforge.outputs.RequestOutput` per request that made progress in a step.

It owns the scheduler (integers), the model runner (tensors) and one detokenizer per live
request; the async server engine and ``rocmforge.LLM`` both drive this class.

A step whose forward pass fails is recovered from here, by the rules of
:mod:`rocmforge.engine.recovery`: out of device memory, the scheduler shrinks the step and it
is scheduled and run again; a transient error, the same step runs again after a backoff;
``step()`` raises only what those (bounded) retries and the runner's isolation could not cure.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from rocmforge.engine.detokenizer import DetokenizerUpdate, IncrementalDetokenizer
from rocmforge.engine.model_runner import ModelRunner
from rocmforge.engine.recovery import RecoveryPolicy
from rocmforge.engine.request import FinishReason, Request
from rocmforge.engine.scheduler import RunnerOutput, Scheduler, SchedulerOutput
from rocmforge.errors import DeviceOutOfMemoryError, RocmForgeError
from rocmforge.outputs import RequestOutput, TokenLogprobs
from rocmforge.sampling_params import SamplingParams
from rocmforge.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Live:
    """Engine-side bookkeeping of a request that is not finished yet."""

    request: Request
    detokenizer: IncrementalDetokenizer
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)


class LLMEngine:
    def __init__(
        self,
        runner: ModelRunner,
        tokenizer: Tokenizer,
        scheduler: Scheduler,
        recovery: RecoveryPolicy | None = None,
    ) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.recovery = recovery or RecoveryPolicy()
        """Retry bounds for failed steps; assign another policy to change them."""
        self._live: dict[str, _Live] = {}

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> Request:
        request = Request(
            request_id=request_id,
            prompt_token_ids=list(prompt_token_ids),
            params=params,
            eos_token_ids=self.tokenizer.stop_ids,
        )
        self.scheduler.add_request(request)
        self._live[request_id] = _Live(request, IncrementalDetokenizer(self.tokenizer, params))
        return request

    def abort(self, request_id: str, reason: FinishReason = FinishReason.CANCELLED) -> None:
        """Finish a request now (client cancel, error); frees its KV blocks before the next step."""
        self.scheduler.finish_request(request_id, reason)
        self._forget(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        executed = self._schedule_and_execute()
        if executed is None:
            return []
        out, result = executed
        for request_id, (start, entries) in result.prompt_logprobs.items():
            # Entry i is for prompt position start + 1 + i; a recompute after preemption
            # delivers positions again, so overwrite rather than append.
            known = self._live[request_id].prompt_logprobs
            del known[start:]
            known.extend(entries)
        updated = self.scheduler.update(out, result)
        return [self._output(request, result.logprobs.get(request.request_id)) for request in updated]

    def _schedule_and_execute(self) -> tuple[SchedulerOutput, RunnerOutput] | None:
        """``schedule()`` then ``runner.execute()``; out of device memory, shrink the step and
        schedule again (bounded). None when there is nothing to run."""
        policy = self.recovery
        retry = 0
        while True:
            out = self.scheduler.schedule()
            if not out.scheduled:
                return None
            try:
                return out, self._execute(out)
            except DeviceOutOfMemoryError as exc:
                if retry == policy.max_oom_retries:
                    logger.error("still out of memory after %d smaller steps: the step fails", retry)
                    raise
                preempted = self.scheduler.shrink_after_oom(out)
                if preempted is None:  # one request, one token: it does not fit even alone
                    return out, self._fail_alone(out, exc)
                limits = self.scheduler.step_limits
                logger.warning(
                    "%s; preempted %d requests, retrying with at most %d requests / %d tokens (retry %d of %d)",
                    exc.message, len(preempted), limits.max_num_seqs, limits.max_num_batched_tokens,
                    retry + 1, policy.max_oom_retries,
                )
                retry += 1

    def _execute(self, out: SchedulerOutput) -> RunnerOutput:
        """``runner.execute(out)``, re-run after transient errors with backoff (bounded), then
        handed to the runner's isolation path."""
        policy = self.recovery
        retry = 0
        while True:
            try:
                return self.runner.execute(out)
            except RocmForgeError as exc:
                if not exc.is_transient():
                    raise
                if retry == policy.max_transient_retries:
                    logger.error("a step of %d requests failed %d times with transient errors (last: %s): "
                                 "isolating its requests", len(out.scheduled), retry + 1, exc)
                    return self.runner.execute_isolated(out, exc)
                delay = policy.backoff_s(retry)
                logger.warning("transient error in a step of %d requests (%s: %s): retry %d of %d in %.0f ms",
                               len(out.scheduled), type(exc).__name__, exc, retry + 1,
                               policy.max_transient_retries, delay * 1e3)
                time.sleep(delay)
                retry += 1

    def _fail_alone(self, out: SchedulerOutput, exc: DeviceOutOfMemoryError) -> RunnerOutput:
        """The step held one request computing one token and still ran out of memory: that
        request fails (``update`` finishes it with ``error``); the engine goes on."""
        [item] = out.scheduled
        rid = item.request.request_id
        message = f"{exc.message} (the request does not fit in device memory even alone)"
        logger.error("request %s failed: %s", rid, message, extra={"request_id": rid})
        return RunnerOutput(sampled={}, failed={rid: f"{type(exc).__name__}: {message}"})

    def _output(self, request: Request, logprobs: TokenLogprobs | None) -> RequestOutput:
        """Detokenize a request's new token, apply stop strings, and package the step's output."""
        live = self._live[request.request_id]
        # ERROR here means the runner gave it no token this step (Scheduler.update).
        token = None if request.finish_reason is FinishReason.ERROR else request.output_token_ids[-1]
        update = live.detokenizer.add(token) if token is not None else DetokenizerUpdate("")
        delta = update.delta
        stop_reason: str | int | None = None
        if update.stop is not None:
            stop_reason = update.stop
            if not request.is_finished:
                self.scheduler.finish_request(request.request_id, FinishReason.STOP)
            elif request.finish_reason is FinishReason.LENGTH:
                # The same token hit max_tokens: the text ends at the stop string, say so.
                request.finish_reason = FinishReason.STOP
        elif request.finish_reason is FinishReason.STOP:
            stop_reason = token
        output = RequestOutput(
            request_id=request.request_id,
            new_token_ids=[token] if token is not None else [],
            delta_text=delta,
            text=live.detokenizer.text,
            finished=request.is_finished,
            num_prompt_tokens=request.num_prompt_tokens,
            num_output_tokens=request.num_output_tokens,
            new_logprobs=[logprobs] if logprobs is not None else [],
        )
        if live.prompt_logprobs and request.num_output_tokens == 1:
            output.prompt_logprobs = live.prompt_logprobs
        if request.is_finished:
            output.delta_text += live.detokenizer.finish()
            output.text = live.detokenizer.text
            output.finish_reason = request.finish_reason.value if request.finish_reason else None
            output.stop_reason = stop_reason
            output.error = request.error
            self._forget(request.request_id)
        return output

    def _forget(self, request_id: str) -> None:
        self._live.pop(request_id, None)
        self.runner.release(request_id)
