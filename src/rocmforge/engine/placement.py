"""Putting a model on a device: weights, KV cache, and the GPU -> CPU fallback of ``auto``.

In: an open GGUF file and :class:`PlacementOptions`. Out: a :class:`Placement` — the model
runner (from then on the owner of every device tensor), the device and dtype used, the model
config, the context length the KV pool allows, and why ``auto`` fell back to the CPU if it did.

Device policy. ``auto`` uses the GPU when one is visible; if it cannot be initialised, or the
weights or the KV cache cannot be placed on it (any torch error, out-of-memory included), the
model is loaded on the CPU instead, a warning is logged and ``Placement.fallback`` says why
(``/health`` reports it). An explicit ``cuda`` never falls back: the failure is a
:class:`~rocmforge.errors.DeviceError` (:class:`~rocmforge.errors.DeviceOutOfMemoryError` for
out-of-memory) with the torch error as its cause.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from rocmforge.attention import get_backend
from rocmforge.device import device_error, resolve_device, resolve_dtype
from rocmforge.engine.model_runner import ModelRunner, kv_block_bytes
from rocmforge.errors import DeviceError, InvalidRequestError
from rocmforge.gguf import GGUFFile
from rocmforge.models.config import ModelConfig
from rocmforge.models.loader import ProgressCallback, load_model
from rocmforge.settings import FaultInjection

logger = logging.getLogger(__name__)

DEFAULT_CPU_KV_BYTES = 512 << 20
GPU_MEMORY_UTILIZATION = 0.85


@dataclass(frozen=True, slots=True)
class PlacementOptions:
    device: str = "auto"
    gpu_index: int = 0
    dtype: str | torch.dtype | None = None
    weight_format: str = "dense"
    kv_cache_memory: int | None = None
    """Bytes for the KV cache (default: 512 MiB on the CPU, 85 % of the GPU memory left)."""
    block_size: int = 16
    max_num_seqs: int = 64
    max_model_len: int | None = None
    faults: FaultInjection = field(default_factory=FaultInjection)


@dataclass(frozen=True, slots=True)
class Placement:
    runner: ModelRunner
    device: torch.device
    dtype: torch.dtype
    config: ModelConfig
    max_model_len: int
    fallback: str | None = None
    """Why ``auto`` ended up on the CPU although a GPU was wanted; None otherwise."""


def place_model(gguf: GGUFFile, options: PlacementOptions, progress: ProgressCallback | None = None) -> Placement:
    auto = options.device.strip().lower() == "auto"
    fallback: str | None = None
    try:
        target = resolve_device(options.device, options.gpu_index, fail_gpu_init=options.faults.gpu_init)
    except DeviceError as exc:
        if not auto:
            raise
        fallback = exc.message
    else:
        try:
            return _place(gguf, target, options.dtype, options, progress)
        # torch's device errors are RuntimeErrors (OOM included); a torch built without CUDA
        # asserts. Only for a GPU target: on the CPU they are bugs, not device trouble.
        except (DeviceError, RuntimeError, AssertionError) as exc:
            if target.type != "cuda":
                raise
            needed = _weight_bytes(gguf, resolve_dtype(options.dtype, target))
            error = device_error(exc, target, "loading the model", needed)
            if not auto:
                if error is exc:
                    raise
                raise error from exc
            fallback = error.message
    # Outside the except blocks, so the failed attempt's tensors are already freed.
    return _fall_back(gguf, fallback or "the GPU is unusable", options, progress)


def _place(
    gguf: GGUFFile,
    device: torch.device,
    dtype_name: str | torch.dtype | None,
    options: PlacementOptions,
    progress: ProgressCallback | None,
) -> Placement:
    """Weights and KV cache on ``device``. Torch errors propagate (the caller translates)."""
    dtype = resolve_dtype(dtype_name, device)
    logger.info("placing the weights on %s as %s (%s)", device, str(dtype).removeprefix("torch."),
                options.weight_format)
    loaded = load_model(
        gguf, device=device, dtype=dtype, attention=get_backend(), weight_format=options.weight_format,
        progress=progress,
    )
    config = loaded.config
    block_size = options.block_size
    block_bytes = kv_block_bytes(config, block_size, dtype)
    context = min(options.max_model_len or config.max_context, config.max_context)
    useful_blocks = options.max_num_seqs * -(-context // block_size)
    num_blocks = _num_kv_blocks(device, options.kv_cache_memory, block_bytes, useful_blocks)
    try:
        runner = ModelRunner(loaded.model, num_blocks, block_size, device, kv_dtype=dtype, faults=options.faults)
    except (RuntimeError, AssertionError) as exc:
        if device.type != "cuda":
            raise
        raise device_error(exc, device, "allocating the KV cache", num_blocks * block_bytes) from exc
    return Placement(runner, device, dtype, config, max_model_len=min(context, num_blocks * block_size))


def _fall_back(gguf: GGUFFile, reason: str, options: PlacementOptions, progress: ProgressCallback | None) -> Placement:
    """``auto`` could not use the GPU: load on the CPU and remember why."""
    logger.warning("GPU unusable, falling back to the CPU: %s", reason)
    if torch.cuda.is_available():
        try:
            torch.cuda.empty_cache()  # whatever the failed attempt left on the GPU
        except RuntimeError:
            logger.debug("could not empty the CUDA cache after the failed attempt", exc_info=True)
    dtype = options.dtype
    if dtype in ("float16", "fp16", torch.float16):
        logger.warning("float16 is not supported on the CPU: using float32")
        dtype = None
    placement = _place(gguf, torch.device("cpu"), dtype, options, progress)
    return Placement(placement.runner, placement.device, placement.dtype, placement.config,
                     placement.max_model_len, fallback=reason)


def _num_kv_blocks(device: torch.device, memory: int | None, block_bytes: int, useful_blocks: int) -> int:
    if memory is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            memory = int(free * GPU_MEMORY_UTILIZATION)
        else:
            memory = DEFAULT_CPU_KV_BYTES
    blocks = min(memory // block_bytes, useful_blocks)
    if blocks < 1:
        raise InvalidRequestError(
            f"KV cache memory {memory} bytes is smaller than one block ({block_bytes} bytes)",
            param="kv_cache_memory",
        )
    return blocks


def _weight_bytes(gguf: GGUFFile, dtype: torch.dtype) -> int:
    """Bytes of the weights dequantized to ``dtype`` (what ``dense`` loading places)."""
    element = torch.empty((), dtype=dtype).element_size()
    return sum(t.n_elements for t in gguf.tensors.values()) * element
