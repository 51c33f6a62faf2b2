"""Making a model runner fail on demand, for tests: the runner is wrapped, never changed.

In: a :class:`~rocmforge.engine.model_runner.ModelRunner` and a
:class:`~rocmforge.testing.fault_spec.FaultInjection`. :func:`inject_faults` wraps the
runner's two entry points the engine calls — ``execute`` (every forward pass of a step:
batched, retried or re-run alone) and ``probe`` (the engine's device check) — with a
:class:`FaultInjector` that raises the asked-for errors before handing over to the real ones.
Out-of-memory faults raise torch's own error for the device inside the runner's translation
(``device_errors``), so what the engine sees is exactly what a real one gives.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from rocmforge.errors import DeviceError, EngineDeadError, ModelExecutionError
from rocmforge.testing.fault_spec import FaultInjection

if TYPE_CHECKING:
    from rocmforge.engine.model_runner import ModelRunner
    from rocmforge.engine.scheduler import RunnerOutput, ScheduledRequest, SchedulerOutput

logger = logging.getLogger(__name__)


class FaultInjector:
    """The faults of one runner: counts what has been injected (transient errors left, a lost
    device) across calls."""

    def __init__(self, runner: ModelRunner, faults: FaultInjection) -> None:
        self._runner = runner
        self._faults = faults
        self._execute = runner.execute
        self._probe = runner.probe
        self._transient_left = faults.transient
        self._device_lost_by: str | None = None

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        scheduled = out.scheduled
        self._check_device(scheduled)
        self._check_requests(scheduled)
        self._check_transient()
        self._check_memory(scheduled)
        return self._execute(out)

    def probe(self) -> None:
        self._check_device([])
        self._check_transient()
        self._probe()

    def _check_device(self, scheduled: list[ScheduledRequest]) -> None:
        if self._device_lost_by is None:
            self._device_lost_by = next((rid for rid in _ids(scheduled) if _matches(rid, self._faults.device_lost)),
                                        None)
            if self._device_lost_by is not None:
                logger.warning("injected fault: the device is lost from now on (request %r)", self._device_lost_by)
        if self._device_lost_by is not None:
            raise DeviceError(f"injected device loss since request {self._device_lost_by!r} (ROCMFORGE_FAULT_INJECT)",
                              device=str(self._runner.device))

    def _check_requests(self, scheduled: list[ScheduledRequest]) -> None:
        for rid in _ids(scheduled):
            if _matches(rid, self._faults.forward_fatal):
                raise EngineDeadError(f"injected fatal fault for request {rid!r} (ROCMFORGE_FAULT_INJECT)")
            if _matches(rid, self._faults.forward_error):
                raise ModelExecutionError(f"injected forward fault for request {rid!r} (ROCMFORGE_FAULT_INJECT)")

    def _check_transient(self) -> None:
        if self._transient_left > 0:
            self._transient_left -= 1
            done = self._faults.transient - self._transient_left
            raise DeviceError(f"injected transient device error {done} of {self._faults.transient} "
                              "(ROCMFORGE_FAULT_INJECT)", device=str(self._runner.device))

    def _check_memory(self, scheduled: list[ScheduledRequest]) -> None:
        limit = self._faults.oom_over
        num_tokens = sum(item.num_tokens for item in scheduled)
        if limit is None or num_tokens <= limit:
            return
        # What torch itself raises on this device, inside the runner's translation.
        what = f"simulated: {num_tokens} batched tokens > oom_over:{limit} (ROCMFORGE_FAULT_INJECT)"
        with self._runner.device_errors(scheduled):
            if self._runner.device.type == "cuda":
                raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB ({what})")
            raise RuntimeError(f"DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                               f"2147483648 bytes ({what})")


def inject_faults(runner: ModelRunner, faults: FaultInjection) -> FaultInjector | None:
    """Wrap ``runner.execute`` and ``runner.probe`` (on this instance) when ``faults`` hit the
    forward pass; returns the injector, or None when there is nothing to inject."""
    if not faults.affects_forward:
        return None
    injector = FaultInjector(runner, faults)
    # Instance attributes shadow the methods: the engine calls these, the class is untouched.
    runner.execute = injector.execute  # type: ignore[method-assign]
    runner.probe = injector.probe  # type: ignore[method-assign]
    logger.warning("fault injection is on (a testing aid, never for production): %s", faults)
    return injector


def _ids(scheduled: list[ScheduledRequest]) -> list[str]:
    return [item.request.request_id for item in scheduled]


def _matches(request_id: str, prefixes: tuple[str, ...]) -> bool:
    return any(request_id.startswith(prefix) for prefix in prefixes)
