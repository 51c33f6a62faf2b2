"""Choosing the compute device and dtype.

In: a device spec (``auto``, ``cpu``, ``cuda``, ``cuda:N``; ROCm builds of torch answer to
``cuda`` too) and an optional dtype name. Out: a ``torch.device`` and ``torch.dtype``.
``auto`` takes the GPU when one is usable and the CPU otherwise; an explicit ``cuda`` that
cannot be used is a :class:`~rocmforge.errors.DeviceError`.
"""

from __future__ import annotations

import logging

import torch

from rocmforge.errors import ConfigError, DeviceError

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_device(spec: str = "auto", gpu_index: int = 0) -> torch.device:
    spec = spec.strip().lower()
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "auto":
        if torch.cuda.is_available():
            return _cuda(gpu_index)
        logger.info("no GPU available: running on the CPU")
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceError(f"device {spec!r} requested but torch sees no CUDA/ROCm GPU")
        index = int(spec.split(":", 1)[1]) if ":" in spec else gpu_index
        return _cuda(index)
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


def _cuda(index: int) -> torch.device:
    count = torch.cuda.device_count()
    if not 0 <= index < count:
        raise DeviceError(f"GPU index {index} out of range: torch sees {count} GPU(s)")
    return torch.device("cuda", index)
