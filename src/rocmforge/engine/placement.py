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

import dataclasses
import logging
from dataclasses import dataclass, field

import torch

from rocmforge.attention import default_backend, get_backend
from rocmforge.device import device_error, free_memory, resolve_device, resolve_dtype
from rocmforge.engine.memory import (
    DEFAULT_GPU_MEMORY_UTILIZATION,
    MIN_CONTEXT_TOKENS,
    MemoryPlan,
    activation_workspace_bytes,
    check_weights_fit,
    module_bytes,
    plan_cpu_kv_cache,
    plan_gpu_kv_cache,
)
from rocmforge.engine.model_runner import ModelRunner, is_out_of_memory, kv_block_bytes
from rocmforge.errors import DeviceError
from rocmforge.gguf import GGUFFile
from rocmforge.models.config import ModelConfig
from rocmforge.models.loader import (
    ProgressCallback,
    load_model,
    placed_weight_bytes,
    resolve_weight_format,
)
from rocmforge.settings import FaultInjection

logger = logging.getLogger(__name__)

DEFAULT_CPU_KV_BYTES = 512 << 20


@dataclass(frozen=True, slots=True)
class PlacementOptions:
    device: str = "auto"
    gpu_index: int = 0
    dtype: str | torch.dtype | None = None
    weight_format: str = "auto"
    kv_cache_memory: int | None = None
    """Bytes for the KV cache (default: 512 MiB on the CPU; on a GPU what the memory plan
    leaves, see :mod:`rocmforge.engine.memory`)."""
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    cuda_graphs: bool = True
    """Replay decode steps from CUDA graphs on a GPU (off: every step launches eagerly)."""
    max_model_len: int | None = None
    faults: FaultInjection = field(default_factory=FaultInjection)


@dataclass(frozen=True, slots=True)
class Placement:
    runner: ModelRunner
    device: torch.device
    dtype: torch.dtype
    config: ModelConfig
    max_model_len: int
    memory_plan: MemoryPlan
    weight_format: str
    """``dense`` or ``quantized``: what ``auto`` resolved to, and ``dense`` where the GPU's
    Triton kernels failed their warm-up."""
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
            needed = placed_weight_bytes(gguf, resolve_dtype(options.dtype, target), options.weight_format, target)
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
    *,
    triton: bool | None = None,
) -> Placement:
    """Weights and KV cache on ``device``. Torch errors propagate (the caller translates).

    ``triton`` (default: a GPU with Triton) runs the Triton kernels: attention, GGUF-block
    linears, fused ops, decode CUDA graphs. A warm-up step then runs them once; if they
    cannot compile or run on this device (an old Triton, an unsupported GPU), the model is
    placed again on the same device with torch's kernels — dense weights, the reference
    attention — and a warning, rather than failing or leaving the GPU."""
    if triton is None:
        triton = default_backend(device) == "triton"
    dtype = resolve_dtype(dtype_name, device)
    # Without Triton a GPU has no kernels for quantized weights: they are dequantized.
    weight_format = options.weight_format if triton or device.type != "cuda" else "dense"
    logger.info("placing the weights on %s as %s (%s)", device, str(dtype).removeprefix("torch."), weight_format)
    if device.type == "cuda":
        free, total = free_memory(device)
        check_weights_fit(placed_weight_bytes(gguf, dtype, weight_format, device), free, total, str(device))
    loaded = load_model(
        gguf, device=device, dtype=dtype, attention=get_backend("triton" if triton else "torch"),
        weight_format=weight_format, fused_kernels=triton, progress=progress,
    )
    config = loaded.config
    block_size = options.block_size
    context = min(options.max_model_len or config.max_context, config.max_context)
    plan = _plan_memory(device, loaded.model, config, dtype, context, options)
    logger.info("%s", plan.describe())
    max_model_len = min(context, plan.num_blocks * block_size)
    try:
        runner = ModelRunner(
            loaded.model, plan.num_blocks, block_size, device, kv_dtype=dtype, faults=options.faults,
            # Graphs need the Triton decode kernel, whose grid depends on host constants only.
            static_decode=options.cuda_graphs and triton, max_num_seqs=options.max_num_seqs,
            max_model_len=max_model_len,
        )
    except (RuntimeError, AssertionError) as exc:
        if device.type != "cuda":
            raise
        raise device_error(exc, device, "allocating the KV cache", plan.kv_bytes) from exc
    if triton:
        try:
            runner.warm_up()
        except Exception as exc:  # Triton's compilation errors are not RuntimeErrors
            if is_out_of_memory(exc):
                raise device_error(exc, device, "running a warm-up step") from exc
            logger.warning("the Triton kernels failed on %s (%s: %s): using torch's kernels (dense weights, "
                           "reference attention) instead", device, type(exc).__name__, str(exc)[:300])
        else:
            runner.capture_decode_graphs()
            return Placement(runner, device, dtype, config, max_model_len=max_model_len, memory_plan=plan,
                             weight_format=resolve_weight_format(weight_format, device))
        del runner, loaded
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return _place(gguf, device, dtype_name, options, progress, triton=False)
    return Placement(runner, device, dtype, config, max_model_len=max_model_len, memory_plan=plan,
                     weight_format=resolve_weight_format(weight_format, device))


def _plan_memory(
    device: torch.device,
    model: torch.nn.Module,
    config: ModelConfig,
    dtype: torch.dtype,
    context: int,
    options: PlacementOptions,
) -> MemoryPlan:
    """The KV pool's size: from the GPU memory left after the weights, or the CPU budget."""
    block_bytes = kv_block_bytes(config, options.block_size, dtype)
    useful_blocks = options.max_num_seqs * -(-context // options.block_size)
    weight_bytes = module_bytes(model)
    workspace = activation_workspace_bytes(config, options.max_num_batched_tokens, options.max_num_seqs, dtype)
    if device.type != "cuda":
        return plan_cpu_kv_cache(
            kv_cache_memory=options.kv_cache_memory or DEFAULT_CPU_KV_BYTES, weight_bytes=weight_bytes,
            workspace_bytes=workspace, block_bytes=block_bytes, max_useful_blocks=useful_blocks,
        )
    free, total = free_memory(device)
    # An explicit max_model_len must fit whole; the model's own context may shrink.
    min_tokens = context if options.max_model_len else min(context, MIN_CONTEXT_TOKENS)
    return plan_gpu_kv_cache(
        device=str(device), free_bytes=free, total_bytes=total, weight_bytes=weight_bytes, workspace_bytes=workspace,
        block_bytes=block_bytes, block_size=options.block_size, min_tokens=min_tokens,
        max_useful_blocks=useful_blocks, utilization=options.gpu_memory_utilization,
        kv_cache_memory=options.kv_cache_memory,
    )


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
    return dataclasses.replace(placement, fallback=reason)
