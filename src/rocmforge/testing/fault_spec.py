"""Faults to inject, for tests only: the ``ROCMFORGE_FAULT_INJECT`` spec, parsed.

In: the spec string (from :mod:`rocmforge.settings`, or written by a test). Out: a frozen
:class:`FaultInjection` that ``LLM`` hands to device selection (``gpu_init``) and to
:class:`~rocmforge.testing.faulty_runner.FaultInjectingRunner`, the wrapper that makes forward
passes fail (the production model runner knows nothing of faults). No torch here: the
settings validate the spec at CLI start-up.
"""

from __future__ import annotations

from dataclasses import dataclass

from rocmforge.errors import ConfigError


@dataclass(frozen=True, slots=True)
class FaultInjection:
    """Faults to inject, for tests only (``ROCMFORGE_FAULT_INJECT``). Empty: inject nothing.

    Spec: comma-separated entries, each one of

    * ``gpu_init``: initialising the GPU fails (device selection behaves as if torch.cuda
      raised), so ``device=auto`` falls back to the CPU and ``device=cuda`` fails;
    * ``forward_error:<prefix>``: a forward pass whose batch holds a request whose id starts
      with ``<prefix>`` raises :class:`~rocmforge.errors.ModelExecutionError` (clients pick
      ids with ``X-Request-Id``);
    * ``forward_fatal:<prefix>``: likewise, but raises the fatal
      :class:`~rocmforge.errors.EngineDeadError`, which kills the engine;
    * ``oom_over:<tokens>``: a forward pass over more than ``<tokens>`` batched tokens runs
      out of device memory (torch's own out-of-memory error for the device, raised inside the
      model runner's translation into :class:`~rocmforge.errors.DeviceOutOfMemoryError`). The limit
      is on tokens, not sequences: a decode-only batch of ``n`` requests is ``n`` tokens, so
      it bounds the batch size too, and a long prompt alone is cured by a smaller chunk;
    * ``transient:<n>``: the first ``n`` forward passes of the process (batched, retried,
      re-run alone or the engine's device probe, each counts) raise the recoverable
      :class:`~rocmforge.errors.DeviceError`, which the engine retries with backoff;
    * ``device_lost:<prefix>``: once a forward pass holds a request whose id starts with
      ``<prefix>``, that pass and every later one (device probes included) raise a
      :class:`~rocmforge.errors.DeviceError`: a device that broke for good, with no request
      to blame after the first.
    """

    gpu_init: bool = False
    forward_error: tuple[str, ...] = ()
    """Request-id prefixes whose forward pass raises ``ModelExecutionError``."""
    forward_fatal: tuple[str, ...] = ()
    """Request-id prefixes whose forward pass raises ``EngineDeadError``."""
    oom_over: int | None = None
    """Forward passes over more batched tokens than this run out of memory; None: never."""
    transient: int = 0
    """How many forward passes (the first ones) raise a transient ``DeviceError``."""
    device_lost: tuple[str, ...] = ()
    """Request-id prefixes whose forward pass breaks the device for good."""

    @classmethod
    def parse(cls, spec: str | None) -> FaultInjection:
        """Parse ``"gpu_init,forward_error:boom,oom_over:64"``; raise :class:`ConfigError`
        naming the bad part."""
        gpu_init = False
        prefixes: dict[str, list[str]] = {"forward_error": [], "forward_fatal": [], "device_lost": []}
        counts: dict[str, int] = {}
        for raw in (spec or "").split(","):
            part = raw.strip()
            if not part:
                continue
            kind, sep, arg = part.partition(":")
            kind, arg = kind.strip(), arg.strip()
            if kind == "gpu_init" and not sep:
                gpu_init = True
            elif kind in prefixes and sep and arg:
                prefixes[kind].append(arg)
            elif kind in ("oom_over", "transient") and kind not in counts and _positive_int(arg):
                counts[kind] = int(arg)
            else:
                raise ConfigError(
                    f"bad fault spec {part!r} in {spec!r} (use gpu_init, forward_error:<request-id prefix>, "
                    "forward_fatal:<request-id prefix>, device_lost:<request-id prefix>, oom_over:<tokens> or "
                    "transient:<count>; the numbers are positive integers, given once each)",
                    param="fault_inject",
                )
        return cls(gpu_init, tuple(prefixes["forward_error"]), tuple(prefixes["forward_fatal"]),
                   counts.get("oom_over"), counts.get("transient", 0), tuple(prefixes["device_lost"]))

    @property
    def active(self) -> bool:
        return self.gpu_init or self.affects_forward

    @property
    def affects_forward(self) -> bool:
        """Some fault hits the model runner's forward pass."""
        return bool(self.forward_error or self.forward_fatal or self.oom_over is not None or self.transient
                    or self.device_lost)


def _positive_int(text: str) -> bool:
    return text.isascii() and text.isdigit() and int(text) > 0
