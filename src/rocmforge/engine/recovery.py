"""What the engine does when a step's forward pass fails: the policy, its knobs, and the code
that applies it.

In: one scheduled step (``Scheduler.schedule()``) and the model runner that executes it. Out:
``(SchedulerOutput, RunnerOutput)`` for :meth:`LLMEngine.step <rocmforge.engine.llm_engine.LLMEngine.step>`
to apply, where requests that could not be computed are in ``RunnerOutput.failed`` (the
scheduler finishes them with ``error``) — or an exception when the device itself is at fault::

    runner.execute(out) raises
     ├─ DeviceOutOfMemoryError ─▶ shrink: halve the step limits (requests, tokens), preempt the
     │                            latest admitted running requests beyond them (recompute
     │                            later), schedule again, run again; at most max_oom_retries
     │                            times, then the step fails. One request computing one token
     │                            that still runs out of memory: blame it or the device (below).
     ├─ transient (errors.is_transient, e.g. DeviceError)
     │                         ─▶ run the same step again after initial_backoff_s, doubling up
     │                            to max_backoff_s, at most max_transient_retries times; then
     │                            isolation (below)
     ├─ fatal                  ─▶ raised at once (the AsyncEngine dies)
     └─ anything else          ─▶ isolation: each request of the step runs alone; those failing
                                  alone get "error", the others their results

    every request failed (alone, or a minimal step out of memory)
                               ─▶ blame: the runner's probe, one forward pass with no request
                                  in it. It passes: the requests were at fault, they fail and
                                  the engine goes on. It fails: the device is at fault, the
                                  probe's error is raised (the AsyncEngine counts such steps:
                                  a few in a row mark it dead).

So a request, however bad, can only fail itself: a step raises only for the device (or a fatal
error). Configured in code (``LLMEngine(..., recovery=RecoveryPolicy(...))`` or by assigning
``engine.recovery``), not from the environment.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Protocol

from rocmforge.engine.scheduler import RunnerOutput, Scheduler, SchedulerOutput
from rocmforge.errors import ConfigError, DeviceOutOfMemoryError, RocmForgeError

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RecoveryPolicy:
    """Bounds of the engine's retries (module docstring). The defaults wait 10, 20, 40 and
    80 ms between the attempts at a step that keeps raising a transient error (150 ms in all)."""

    max_transient_retries: int = 4
    """Re-runs of a step after a transient error (0: none, go straight to isolation)."""
    initial_backoff_s: float = 0.010
    """Wait before the first re-run; each next one waits twice as long."""
    max_backoff_s: float = 0.080
    """Longest wait between two attempts."""
    max_oom_retries: int = 16
    """Smaller steps tried after out-of-memory errors within one ``step()`` (halving from
    2048 tokens reaches one token in 11)."""

    def __post_init__(self) -> None:
        for name in ("max_transient_retries", "max_oom_retries"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name} must be an integer >= 0, got {value!r}", param=name)
        if not 0 <= self.initial_backoff_s <= self.max_backoff_s:
            raise ConfigError(
                f"need 0 <= initial_backoff_s <= max_backoff_s, got {self.initial_backoff_s} and "
                f"{self.max_backoff_s}",
                param="initial_backoff_s",
            )

    def backoff_s(self, retry: int) -> float:
        """Seconds to wait before re-run number ``retry`` (0-based)."""
        return min(self.max_backoff_s, self.initial_backoff_s * 2**retry)


class StepExecutor(Protocol):
    """What recovery needs of the model runner (or of a wrapper around it)."""

    def execute(self, out: SchedulerOutput) -> RunnerOutput: ...

    def probe(self) -> None: ...


def run_step(scheduler: Scheduler, runner: StepExecutor, policy: RecoveryPolicy) -> tuple[SchedulerOutput, RunnerOutput] | None:
    """``schedule()`` then ``runner.execute()``, recovering as the module docstring says. None
    when there is nothing to run."""
    retry = 0
    while True:
        out = scheduler.schedule()
        if not out.scheduled:
            return None
        try:
            return out, _execute(runner, out, policy)
        except DeviceOutOfMemoryError as exc:
            if retry == policy.max_oom_retries:
                logger.error("still out of memory after %d smaller steps: the step fails", retry)
                raise
            preempted = scheduler.shrink_after_oom(out)
            if preempted is None:  # one request, one token: it does not fit even alone
                return out, _fail_all(runner, out, exc, "the request does not fit in device memory even alone")
            limits = scheduler.step_limits
            logger.warning(
                "%s; preempted %d requests, retrying with at most %d requests / %d tokens (retry %d of %d)",
                exc.message, len(preempted), limits.max_num_seqs, limits.max_num_batched_tokens,
                retry + 1, policy.max_oom_retries,
            )
            retry += 1


def _execute(runner: StepExecutor, out: SchedulerOutput, policy: RecoveryPolicy) -> RunnerOutput:
    """``runner.execute(out)``: transient errors re-run after a backoff (bounded), then, like
    any other failure but out-of-memory and fatal errors, request by request."""
    retry = 0
    while True:
        try:
            return runner.execute(out)
        except Exception as exc:
            if isinstance(exc, RocmForgeError) and (exc.is_fatal() or isinstance(exc, DeviceOutOfMemoryError)):
                raise
            if not (isinstance(exc, RocmForgeError) and exc.is_transient()):
                return _isolate(runner, out, exc)
            if retry == policy.max_transient_retries:
                logger.error("a step of %d requests failed %d times with transient errors (last: %s): "
                             "isolating its requests", len(out.scheduled), retry + 1, exc)
                return _isolate(runner, out, exc)
            delay = policy.backoff_s(retry)
            logger.warning("transient error in a step of %d requests (%s: %s): retry %d of %d in %.0f ms",
                           len(out.scheduled), type(exc).__name__, exc, retry + 1,
                           policy.max_transient_retries, delay * 1e3)
            time.sleep(delay)
            retry += 1


def _isolate(runner: StepExecutor, out: SchedulerOutput, batch_error: Exception) -> RunnerOutput:
    """The step ``out`` failed with ``batch_error``: each request runs alone (one that was
    alone already is not run again). Re-running is safe: a request's share of the step writes
    the same KV slots with the same values, and a request the failed attempt had sampled for is
    sampled again (a seeded request's generator moves on one draw)."""
    scheduled = out.scheduled
    if len(scheduled) == 1:
        return _fail_all(runner, out, batch_error)
    logger.warning("batched step of %d requests failed (%s: %s): running them one at a time",
                   len(scheduled), type(batch_error).__name__, batch_error)
    result = RunnerOutput(sampled={})
    for item in scheduled:
        rid = item.request.request_id
        alone = SchedulerOutput(scheduled=[item], preempted=[], num_batched_tokens=item.num_tokens)
        try:
            single = runner.execute(alone)
        except Exception as exc:
            if isinstance(exc, RocmForgeError) and exc.is_fatal():
                raise
            logger.error("request %s fails on its own: %s: %s", rid, type(exc).__name__, exc,
                         extra={"request_id": rid})
            result.failed[rid] = _describe(exc)
            continue
        result.sampled.update(single.sampled)
        result.logprobs.update(single.logprobs)
        result.prompt_logprobs.update(single.prompt_logprobs)
        result.pooled.update(single.pooled)
    if len(result.failed) == len(scheduled):
        _blame(runner, batch_error)
    return result


def _fail_all(runner: StepExecutor, out: SchedulerOutput, error: Exception, why: str | None = None) -> RunnerOutput:
    """Every request of the step failed on its own: if the device passes its probe, they
    fail (with ``error``, and ``why`` added); otherwise the probe's error is raised."""
    _blame(runner, error)
    message = _describe(error) + (f" ({why})" if why else "")
    for item in out.scheduled:
        rid = item.request.request_id
        logger.error("request %s fails on its own: %s", rid, message, extra={"request_id": rid})
    return RunnerOutput(sampled={}, failed={item.request.request_id: message for item in out.scheduled})


def _blame(runner: StepExecutor, error: Exception) -> None:
    """Probe the device after every request of a step failed with ``error``: raise the
    probe's error if the device fails with no request in it (the requests are then not to
    blame)."""
    try:
        runner.probe()
    except Exception as probe_error:
        logger.error("the device probe failed too (%s: %s): the device, not the requests, is at fault",
                     type(probe_error).__name__, probe_error)
        raise probe_error from error
    logger.info("the device probe passed: the requests that failed are at fault, not the device")


def _describe(exc: BaseException) -> str:
    message = exc.message if isinstance(exc, RocmForgeError) else str(exc)
    return f"{type(exc).__name__}: {message}"
