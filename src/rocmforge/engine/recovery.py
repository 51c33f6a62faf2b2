"""What the engine does when a step's forward pass fails: the policy and its knobs.

In: the exception ``ModelRunner.execute`` raised for a step. Out: a retry, a smaller step, or
the error, as below. :class:`RecoveryPolicy` holds the bounds; :class:`LLMEngine.step
<rocmforge.engine.llm_engine.LLMEngine>` applies it, the scheduler shrinks the step
(:meth:`~rocmforge.engine.scheduler.Scheduler.shrink_after_oom`) and the runner isolates
requests (:meth:`~rocmforge.engine.model_runner.ModelRunner.execute_isolated`)::

    runner.execute(out) raises
     ├─ DeviceOutOfMemoryError ─▶ shrink: halve the step limits (requests, tokens), preempt the
     │                            latest admitted running requests beyond them (recompute
     │                            later), schedule again, run again; at most max_oom_retries
     │                            times, then the step fails. One request computing one token
     │                            that still runs out of memory fails alone (finish "error").
     ├─ transient (errors.is_transient, e.g. DeviceError)
     │                         ─▶ run the same step again after initial_backoff_s, doubling up
     │                            to max_backoff_s, at most max_transient_retries times; then
     │                            the isolation path: each request alone, those failing alone
     │                            get "error", and if all do the step fails
     ├─ fatal                  ─▶ the step fails (the AsyncEngine dies)
     └─ anything else          ─▶ the runner has isolated it already; if every request failed
                                  alone, the step fails

A failed step is the :class:`~rocmforge.engine.async_engine.AsyncEngine`'s business: it
errors the requests of the batch and keeps serving (too many failed steps in a row kill it).
Configured in code (``LLMEngine(..., recovery=RecoveryPolicy(...))`` or by assigning
``engine.recovery``), not from the environment.
"""

from __future__ import annotations

from dataclasses import dataclass

from rocmforge.errors import ConfigError


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
