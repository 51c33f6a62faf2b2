"""Choosing the compute device and dtype, translating device failures, reading memory use.

In: a device spec (``auto``, ``cpu``, ``cuda``, ``cuda:N``; ROCm builds of torch answer to
``cuda`` too) and an optional dtype name. Out: a ``torch.device`` and ``torch.dtype``.
``auto`` takes the GPU when one is visible and the CPU when none is; a GPU that is visible
but cannot be initialised is a :class:`~rocmforge.errors.DeviceError` whatever the spec (the
caller, :class:`rocmforge.LLM`, owns the policy: under ``auto`` it falls back to the CPU, an
explicit ``cuda`` fails).

:func:`device_error` turns a torch failure met while placing something on a device into a
typed :class:`~rocmforge.errors.DeviceError` (:class:`~rocmforge.errors.DeviceOutOfMemoryError`
for torch's out-of-memory, naming how much was needed when that is known); callers raise it
``from`` the original so the cause is kept. :func:`memory_usage` is what ``/health`` reports.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

import torch

from rocmforge.errors import ConfigError, DeviceError, DeviceOutOfMemoryError

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
SIMULATED_GPU_FAILURE = "simulated GPU initialisation failure (ROCMFORGE_FAULT_INJECT=gpu_init)"
_TRIED_TO_ALLOCATE = re.compile(r"Tried to allocate ([0-9.]+ ?[KMGT]?i?B)", re.IGNORECASE)


def resolve_device(spec: str = "auto", gpu_index: int = 0, *, fail_gpu_init: bool = False) -> torch.device:
    """The device ``spec`` names. ``fail_gpu_init`` (a testing aid: ``ROCMFORGE_FAULT_INJECT=gpu_init``)
    makes probing the GPU fail as if torch.cuda raised while initialising, GPU or not.

    Raises :class:`DeviceError` (cause kept) when a GPU is needed or visible but unusable,
    :class:`ConfigError` for an unknown spec."""
    spec = spec.strip().lower()
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "auto":
        if _gpu_count(fail_gpu_init) > 0:
            return _cuda(gpu_index)
        logger.info("no GPU available: running on the CPU")
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        index_text = spec.split(":", 1)[1] if ":" in spec else str(gpu_index)
        if not index_text.isdigit():
            raise ConfigError(f"bad GPU index in device {spec!r} (use cuda:N)", param="device")
        if _gpu_count(fail_gpu_init) == 0:
            raise DeviceError(f"device {spec!r} requested but torch sees no CUDA/ROCm GPU")
        return _cuda(int(index_text))
    raise ConfigError(f"unknown device {spec!r} (use auto, cpu, cuda or cuda:N)", param="device")


def resolve_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The compute dtype: fp32 on the CPU and bf16 on a GPU unless asked otherwise."""
    if isinstance(name, torch.dtype):
        dtype = name
    elif name is None or name == "auto":
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    elif name in DTYPES:
        dtype = DTYPES[name]
    else:
        raise ConfigError(f"unknown dtype {name!r} (use {', '.join(DTYPES)})", param="dtype")
    if device.type == "cpu" and dtype == torch.float16:
        raise ConfigError("float16 is not supported on the CPU; use float32 or bfloat16", param="dtype")
    return dtype


def device_error(exc: BaseException, device: torch.device, what: str, needed_bytes: int | None = None) -> DeviceError:
    """A typed error for ``exc``, raised while ``what`` (e.g. "loading the weights") on
    ``device``; raise it ``from exc``. An existing :class:`DeviceError` is returned as is."""
    if isinstance(exc, DeviceError):
        return exc
    if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower():
        parts = []
        if needed_bytes is not None:
            parts.append(f"needs about {format_bytes(needed_bytes)}")
        tried = _TRIED_TO_ALLOCATE.search(str(exc))
        if tried:
            parts.append(f"failed allocating {tried.group(1)}")
        detail = f" ({', '.join(parts)})" if parts else ""
        return DeviceOutOfMemoryError(
            f"out of memory on {device} while {what}{detail}", needed_bytes=needed_bytes, device=str(device)
        )
    return DeviceError(f"{device} failed while {what}: {type(exc).__name__}: {exc}", device=str(device))


def to_device(values: list | float, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``torch.tensor(values, device=device)`` without waiting for the device: a plain
    ``torch.tensor(..., device="cuda")`` copies synchronously, so the host would first wait
    for every kernel already queued (a step's forward pass). Copied with ``non_blocking``
    from pageable memory, which CUDA stages at once and orders on the stream."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def free_memory(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes of a GPU's memory, as the driver reports them now."""
    return torch.cuda.mem_get_info(device)


@dataclass(frozen=True, slots=True)
class MemoryUsage:
    """Bytes in use and in total: the device's memory on a GPU, the process's resident set
    size against the machine's RAM on the CPU. ``None`` where it could not be read."""

    kind: str
    """``device`` (GPU memory) or ``process_rss`` (CPU)."""
    used_bytes: int | None
    total_bytes: int | None


def memory_usage(device: torch.device) -> MemoryUsage:
    """Never raises: a value that cannot be read is ``None`` (logged at debug)."""
    if device.type == "cuda":
        try:
            free, total = torch.cuda.mem_get_info(device)
        except Exception as exc:  # a broken device must not break the liveness probe
            logger.debug("cannot read the memory of %s: %s", device, exc)
            return MemoryUsage("device", None, None)
        return MemoryUsage("device", total - free, total)
    return MemoryUsage("process_rss", _process_rss(), _system_ram())


def available_host_memory() -> int | None:
    """Bytes of RAM the kernel could give this process now (``MemAvailable``: free memory
    plus reclaimable page cache), or None where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (SMT siblings counted once);
    the logical count where the topology cannot be read."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        try:
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list", encoding="ascii") as f:
                cores.add(f.read().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


def set_cpu_threads(threads: int | None) -> int:
    """Size torch's intra-op pool (the native CPU kernels share it): ``threads``, or the
    physical cores. Returns the count set."""
    count = threads or physical_cores()
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return count


def format_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _gpu_count(fail_init: bool) -> int:
    """GPUs torch can use: 0 when none is visible; DeviceError when one is but cannot be
    initialised."""
    try:
        if fail_init:
            raise RuntimeError(SIMULATED_GPU_FAILURE)
        if not torch.cuda.is_available():
            return 0
        torch.cuda.init()
        return torch.cuda.device_count()
    except (RuntimeError, AssertionError) as exc:  # torch.cuda raises both while initialising
        raise DeviceError(f"the GPU could not be initialised: {exc}") from exc


def _cuda(index: int) -> torch.device:
    count = torch.cuda.device_count()
    if not 0 <= index < count:
        raise DeviceError(f"GPU index {index} out of range: torch sees {count} GPU(s)")
    return torch.device("cuda", index)


def _process_rss() -> int | None:
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:  # no /proc (macOS): the peak, the best the standard library offers
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if os.uname().sysname == "Darwin" else peak * 1024
    except (ImportError, OSError, ValueError):
        return None


def _system_ram() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError, AttributeError):
        return None
