"""Putting a model on a device: weights, KV cache, and the GPU -> CPU fallback of ``auto``.

In: an open GGUF file and the :class:`~rocmforge.config.EngineConfig` (load, device, cache
and scheduler parts). Out: a :class:`Placement` — the model runner (from then on the owner of
every device tensor), the device and dtype used, the model config, the context length the KV
pool allows, and why ``auto`` fell back to the CPU if it did.

Device policy. ``auto`` uses the GPU when one is visible; if it cannot be initialised, or the
weights or the KV cache cannot be placed on it (any torch error, out-of-memory included), the
model is loaded on the CPU instead, a warning is logged and ``Placement.fallback`` says why
(``/health`` reports it). An explicit ``cuda`` never falls back: the failure is a
:class:`~rocmforge.errors.DeviceError` (:class:`~rocmforge.errors.DeviceOutOfMemoryError` for
out-of-memory) with the torch error as its cause.

Sizing the KV pool. On a GPU the activation workspace is measured, not estimated: before the
pool exists, a profiling runner (a pool just big enough for one full step) runs the largest
step the engine will run (:meth:`ModelRunner.profile_step`: ``max_num_batched_tokens``
prefill tokens, ``max_num_seqs`` sampled rows with every sampler feature, prompt logprobs of
a whole chunk, the largest padded decode step) under the allocator's peak statistics; the
pool then gets what is left (:mod:`rocmforge.engine.memory`). That first step also compiles
the Triton kernels: if a kernel cannot compile or launch on this device (an old Triton, an
unsupported GPU) — and only then — the model is placed again on the same GPU with torch's
kernels and a warning, rather than failing or leaving the GPU. On the CPU the workspace is
the estimate of :func:`~rocmforge.engine.memory.activation_workspace_bytes`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass

import torch

from rocmforge import native
from rocmforge.attention import default_backend, get_backend
from rocmforge.config import EngineConfig
from rocmforge.device import (
    available_host_memory,
    device_error,
    free_memory,
    resolve_device,
    resolve_dtype,
    set_cpu_threads,
)
from rocmforge.engine.memory import (
    MIN_CONTEXT_TOKENS,
    MemoryPlan,
    activation_workspace_bytes,
    check_host_memory,
    check_weights_fit,
    measured_workspace_bytes,
    module_bytes,
    plan_cpu_kv_cache,
    plan_gpu_kv_cache,
)
from rocmforge.engine.model_runner import ModelRunner, is_out_of_memory, kv_block_bytes
from rocmforge.errors import DeviceError
from rocmforge.gguf import GGUFFile
from rocmforge.kernels import is_kernel_error
from rocmforge.models.config import ModelConfig
from rocmforge.models.loader import (
    LoadedModel,
    ProgressCallback,
    load_model,
    placed_weight_bytes,
    resolve_weight_format,
)
from rocmforge.models.validate import checked_config

logger = logging.getLogger(__name__)

DEFAULT_CPU_KV_BYTES = 512 << 20
"""The CPU's KV budget when ``kv_cache_memory`` is unset (``CacheConfig`` documents it)."""


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
    Triton kernels failed their first step."""
    fallback: str | None = None
    """Why ``auto`` ended up on the CPU although a GPU was wanted; None otherwise."""


def place_model(
    gguf: GGUFFile,
    config: EngineConfig,
    progress: ProgressCallback | None = None,
    *,
    vocab_size: int | None = None,
    fail_gpu_init: bool = False,
) -> Placement:
    """``vocab_size``: the ids the runner may sample (the tokenizer's). ``fail_gpu_init``: a
    testing aid (``ROCMFORGE_FAULT_INJECT=gpu_init``), device selection fails as if torch.cuda
    raised."""
    device_config = config.device
    auto = device_config.device.strip().lower() == "auto"
    fallback: str | None = None
    try:
        target = resolve_device(device_config.device, device_config.gpu_index, fail_gpu_init=fail_gpu_init)
    except DeviceError as exc:
        if not auto:
            raise
        fallback = exc.message
    else:
        try:
            return _place(gguf, target, config, progress, vocab_size)
        # torch's device errors are RuntimeErrors (OOM included); a torch built without CUDA
        # asserts. Only for a GPU target: on the CPU they are bugs, not device trouble.
        except (DeviceError, RuntimeError, AssertionError) as exc:
            if target.type != "cuda":
                raise
            load = config.load
            needed = placed_weight_bytes(gguf, resolve_dtype(load.dtype, target), load.weight_format, target)
            error = device_error(exc, target, "loading the model", needed)
            if not auto:
                if error is exc:
                    raise
                raise error from exc
            fallback = error.message
    # Outside the except blocks, so the failed attempt's tensors are already freed.
    return _fall_back(gguf, fallback or "the GPU is unusable", config, progress, vocab_size)


def _place(
    gguf: GGUFFile,
    device: torch.device,
    config: EngineConfig,
    progress: ProgressCallback | None,
    vocab_size: int | None,
    *,
    triton: bool | None = None,
) -> Placement:
    """Weights and KV cache on ``device``. Torch errors propagate (the caller translates).

    ``triton`` (default: a GPU with Triton) runs the Triton kernels: attention, GGUF-block
    linears, fused ops, decode CUDA graphs; if they fail their first step (module
    docstring), this places the model again with ``triton=False``."""
    if triton is None:
        triton = default_backend(device) == "triton"
    dtype = resolve_dtype(config.load.dtype, device)
    # Without Triton a GPU has no kernels for quantized weights: they are dequantized.
    weight_format = config.load.weight_format if triton or device.type != "cuda" else "dense"
    logger.info("placing the weights on %s as %s (%s)", device, str(dtype).removeprefix("torch."), weight_format)
    if device.type == "cuda":
        free, total = free_memory(device)
        check_weights_fit(placed_weight_bytes(gguf, dtype, weight_format, device), free, total, str(device))
    else:
        threads = set_cpu_threads(config.device.threads)
        logger.info("CPU threads: %d", threads)
        check_host_memory(
            weight_bytes=placed_weight_bytes(gguf, dtype, weight_format, device),
            kv_bytes=config.cache.kv_cache_memory or DEFAULT_CPU_KV_BYTES,
            workspace_bytes=_cpu_workspace(checked_config(gguf), dtype, config),
            available_bytes=available_host_memory(),
        )
    # The CPU's quantized path runs the native fused ops and decode attention as well.
    native_cpu = (device.type == "cpu" and dtype == torch.float32 and native.available()
                  and resolve_weight_format(weight_format, device) == "quantized")
    loaded = load_model(
        gguf, device=device, dtype=dtype, attention=get_backend("triton" if triton else "native" if native_cpu else "torch"),
        weight_format=weight_format, fused_kernels=triton or native_cpu, progress=progress,
    )
    model_config = loaded.config
    context = min(config.scheduler.max_model_len or model_config.max_context, model_config.max_context)
    static_decode = config.device.cuda_graphs and triton  # graphs need the Triton decode kernel
    try:
        workspace = _first_step(loaded, device, dtype, config, context, static_decode, vocab_size, triton)
    except Exception as exc:
        if not (triton and is_kernel_error(exc)):
            raise
        logger.warning("the Triton kernels failed on %s (%s: %s): using torch's kernels (dense weights, "
                       "reference attention) instead", device, type(exc).__name__, str(exc)[:300])
        del loaded
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return _place(gguf, device, config, progress, vocab_size, triton=False)
    if workspace is not None:
        plan = _plan_gpu(device, loaded, dtype, context, config, workspace)
    else:
        plan = _plan_cpu(loaded, dtype, context, config)
    logger.info("%s", plan.describe())
    max_model_len = min(context, plan.num_blocks * config.cache.block_size)
    try:
        runner = _runner(loaded, plan.num_blocks, device, dtype, config, static_decode, max_model_len, vocab_size)
    except (RuntimeError, AssertionError) as exc:
        if device.type != "cuda":
            raise
        raise device_error(exc, device, "allocating the KV cache", plan.kv_bytes) from exc
    runner.capture_decode_graphs()
    return Placement(runner, device, dtype, model_config, max_model_len=max_model_len, memory_plan=plan,
                     weight_format=resolve_weight_format(weight_format, device))


def _runner(
    loaded: LoadedModel,
    num_blocks: int,
    device: torch.device,
    dtype: torch.dtype,
    config: EngineConfig,
    static_decode: bool,
    max_model_len: int,
    vocab_size: int | None,
) -> ModelRunner:
    return ModelRunner(
        loaded.model, num_blocks, config.cache.block_size, device, kv_dtype=dtype, static_decode=static_decode,
        max_num_seqs=config.scheduler.max_num_seqs, max_model_len=max_model_len, vocab_size=vocab_size,
    )


def _first_step(
    loaded: LoadedModel,
    device: torch.device,
    dtype: torch.dtype,
    config: EngineConfig,
    context: int,
    static_decode: bool,
    vocab_size: int | None,
    triton: bool,
) -> int | None:
    """Before the KV pool exists, on a profiling runner: a warm-up step (compiles the Triton
    kernels: a kernel that cannot run here fails now) and, on a GPU, the measured activation
    workspace of the largest step (module docstring). None on the CPU (nothing measured)."""
    if device.type != "cuda" and not triton:
        return None
    scheduler = config.scheduler
    measure = device.type == "cuda"
    blocks = -(-scheduler.max_num_batched_tokens // config.cache.block_size) if measure else 1
    profiler = _runner(loaded, blocks, device, dtype, config, static_decode, context, vocab_size)
    try:
        profiler.warm_up()
        if not measure:
            return None
        peak = profiler.measure_workspace(scheduler.max_num_batched_tokens, scheduler.max_num_seqs)
    except RuntimeError as exc:
        if is_out_of_memory(exc):
            raise device_error(exc, device, "profiling the largest step") from exc
        raise
    finally:
        loaded.model.unbind_kv_cache()  # the profiling pool is freed with the profiler
        del profiler
        if measure:
            with contextlib.suppress(RuntimeError):
                torch.cuda.empty_cache()
    logger.info("profiled the largest step (%d tokens, %d sequences): %.1f MiB of activations on %s",
                scheduler.max_num_batched_tokens, scheduler.max_num_seqs, peak / 2**20, device)
    return measured_workspace_bytes(peak)


def _plan_gpu(
    device: torch.device,
    loaded: LoadedModel,
    dtype: torch.dtype,
    context: int,
    config: EngineConfig,
    workspace: int,
) -> MemoryPlan:
    """The KV pool's size from the GPU memory left after the weights and the measured workspace."""
    cache, scheduler = config.cache, config.scheduler
    free, total = free_memory(device)
    # An explicit max_model_len must fit whole; the model's own context may shrink.
    min_tokens = context if scheduler.max_model_len else min(context, MIN_CONTEXT_TOKENS)
    return plan_gpu_kv_cache(
        device=str(device), free_bytes=free, total_bytes=total, weight_bytes=module_bytes(loaded.model),
        workspace_bytes=workspace, block_bytes=kv_block_bytes(loaded.config, cache.block_size, dtype),
        block_size=cache.block_size, min_tokens=min_tokens,
        max_useful_blocks=scheduler.max_num_seqs * -(-context // cache.block_size),
        utilization=config.device.gpu_memory_utilization, kv_cache_memory=cache.kv_cache_memory,
    )


def _plan_cpu(loaded: LoadedModel, dtype: torch.dtype, context: int, config: EngineConfig) -> MemoryPlan:
    """The CPU's KV pool: a fixed budget, the workspace an estimate."""
    cache, scheduler = config.cache, config.scheduler
    return plan_cpu_kv_cache(
        kv_cache_memory=cache.kv_cache_memory or DEFAULT_CPU_KV_BYTES, weight_bytes=module_bytes(loaded.model),
        workspace_bytes=_cpu_workspace(loaded.config, dtype, config),
        block_bytes=kv_block_bytes(loaded.config, cache.block_size, dtype),
        max_useful_blocks=scheduler.max_num_seqs * -(-context // cache.block_size),
    )


def _cpu_workspace(model_config: ModelConfig, dtype: torch.dtype, config: EngineConfig) -> int:
    scheduler = config.scheduler
    return activation_workspace_bytes(model_config, scheduler.max_num_batched_tokens, scheduler.max_num_seqs, dtype)


def _fall_back(
    gguf: GGUFFile, reason: str, config: EngineConfig, progress: ProgressCallback | None, vocab_size: int | None
) -> Placement:
    """``auto`` could not use the GPU: load on the CPU and remember why."""
    logger.warning("GPU unusable, falling back to the CPU: %s", reason)
    if torch.cuda.is_available():
        try:
            torch.cuda.empty_cache()  # whatever the failed attempt left on the GPU
        except RuntimeError:
            logger.debug("could not empty the CUDA cache after the failed attempt", exc_info=True)
    if config.load.dtype in ("float16", "fp16"):
        logger.warning("float16 is not supported on the CPU: using float32")
        config = dataclasses.replace(config, load=dataclasses.replace(config.load, dtype="auto"))
    placement = _place(gguf, torch.device("cpu"), config, progress, vocab_size)
    return dataclasses.replace(placement, fallback=reason)
