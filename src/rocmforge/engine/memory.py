"""Memory planning: what the weights, the activations and the paged KV cache may take.

In: byte counts only — the device's free and total memory (read by the caller with
``torch.cuda.mem_get_info`` once the weights are placed), what the weights hold, the
activation workspace (on a GPU measured by profiling the largest step before the KV pool
exists, :func:`measured_workspace_bytes`; on the CPU the estimate
:func:`activation_workspace_bytes`) and the bytes of one KV block. Out: a :class:`MemoryPlan`
(how many KV blocks, and the breakdown logged at start-up
and shown by ``/health``), or a :class:`~rocmforge.errors.DeviceOutOfMemoryError` that says
how much the model needs and how much the device has.

Nothing here touches a device, so the policy is unit-tested on the CPU with made-up numbers.

GPU policy (vLLM's ``gpu_memory_utilization``)::

    |<------------------------------ total ------------------------------>|
    |  other processes,  |  weights  | workspace |   KV cache   | reserve  |
    |  CUDA context      |           |           |              |          |
                         |<-- used after load -->|
    reserve   = (1 - utilization) * total        (headroom: allocator slack, graphs, NCCL...)
    KV budget = free after the weights - workspace - reserve

The KV cache must hold at least ``min_tokens`` tokens (one context of the length the user
asked for, or :data:`MIN_CONTEXT_TOKENS` when the model's own context length is just a
default the pool may shrink). Blocks beyond what ``max_num_seqs`` full contexts can use are
not allocated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rocmforge.device import format_bytes
from rocmforge.errors import ConfigError, DeviceOutOfMemoryError
from rocmforge.models.config import ModelConfig

MIN_CONTEXT_TOKENS = 256
"""The smallest context a pool may shrink to before the model counts as not fitting."""
_FRAGMENTATION = 1.25
"""Allocator slack on top of the tensors a step provably holds at once."""


@dataclass(frozen=True, slots=True)
class MemoryPlan:
    device: str
    weight_bytes: int
    """Bytes of the weights as placed (quantized blocks count at their GGUF size)."""
    workspace_bytes: int
    """Activation workspace kept free for the largest step (measured on a GPU, estimated on
    the CPU)."""
    reserve_bytes: int
    """Headroom left unplanned: ``(1 - utilization) * total`` on a GPU."""
    block_bytes: int
    num_blocks: int
    """Blocks the scheduler hands out; the runner allocates one more (its scratch block)."""
    total_bytes: int | None
    """The device's memory (None on the CPU, where the KV budget is a fixed size)."""

    @property
    def kv_bytes(self) -> int:
        return (self.num_blocks + 1) * self.block_bytes

    def describe(self) -> str:
        """One line for the start-up log."""
        total = f" of {format_bytes(self.total_bytes)}" if self.total_bytes is not None else ""
        return (
            f"memory plan on {self.device}{total}: weights {format_bytes(self.weight_bytes)}, "
            f"activation workspace {format_bytes(self.workspace_bytes)}, KV cache "
            f"{format_bytes(self.kv_bytes)} ({self.num_blocks} blocks), reserve {format_bytes(self.reserve_bytes)}"
        )


def activation_workspace_bytes(
    config: ModelConfig,
    max_num_batched_tokens: int,
    max_num_seqs: int,
    dtype: torch.dtype,
) -> int:
    """Upper estimate of what one step allocates besides weights and KV cache, on the CPU
    (a GPU measures it instead: :meth:`ModelRunner.measure_workspace
    <rocmforge.engine.model_runner.ModelRunner.measure_workspace>`).

    Per batched token, live at once inside a decoder layer: the residual stream, its normed
    copy and the layer output (3 x hidden), Q/K/V and the attention output
    (q + 2 kv + q), gate|up and the SwiGLU product (3 x intermediate), plus fp32 RoPE factors.
    Per step: fp32 logits of every sampling row and of a whole chunk (prompt logprobs), with
    the sampler's two temporaries of that size. Times an allocator-slack factor.
    """
    element = torch.empty((), dtype=dtype).element_size()
    per_token = (
        3 * config.hidden_size + 2 * config.q_size + 2 * config.kv_size + 3 * config.intermediate_size
    ) * element + config.head_dim * 4
    logits_rows = max_num_seqs + max_num_batched_tokens
    logits = 3 * logits_rows * config.vocab_size * 4
    return int((max_num_batched_tokens * per_token + logits) * _FRAGMENTATION)


def measured_workspace_bytes(peak_bytes: int) -> int:
    """The workspace a GPU plan keeps free: the profiled peak of the largest step, with the
    allocator's slack on top."""
    return int(peak_bytes * _FRAGMENTATION)


def check_weights_fit(weight_bytes: int, free_bytes: int, total_bytes: int, device: str) -> None:
    """Before loading: raise if the weights alone cannot fit in the device's free memory."""
    if weight_bytes > free_bytes:
        raise DeviceOutOfMemoryError(
            f"the model does not fit on {device}: its weights need {format_bytes(weight_bytes)}, the device has "
            f"{format_bytes(free_bytes)} free of {format_bytes(total_bytes)} (try a smaller quantization, "
            "weight_format=quantized, or another GPU)",
            needed_bytes=weight_bytes, device=device,
        )


def plan_gpu_kv_cache(
    *,
    device: str,
    free_bytes: int,
    total_bytes: int,
    weight_bytes: int,
    workspace_bytes: int,
    block_bytes: int,
    block_size: int,
    min_tokens: int,
    max_useful_blocks: int,
    utilization: float,
    kv_cache_memory: int | None = None,
) -> MemoryPlan:
    """Size the KV pool from the memory left once the weights are placed (module docstring).

    ``kv_cache_memory`` (bytes), when given, replaces the computed budget but must still fit.
    Raises :class:`DeviceOutOfMemoryError` naming what is needed when ``min_tokens`` of KV
    cache do not fit."""
    if not 0.0 < utilization <= 1.0:
        raise ValueError(f"utilization must be in (0, 1], got {utilization}")
    reserve = int((1.0 - utilization) * total_bytes)
    available = free_bytes - workspace_bytes - reserve
    budget = available if kv_cache_memory is None else min(kv_cache_memory, available)
    min_blocks = -(-min_tokens // block_size) + 1  # + the runner's scratch block
    if budget < min_blocks * block_bytes:
        needed = weight_bytes + workspace_bytes + min_blocks * block_bytes + reserve
        raise DeviceOutOfMemoryError(
            f"the model does not fit on {device}: it needs about {format_bytes(needed)} (weights "
            f"{format_bytes(weight_bytes)}, activation workspace {format_bytes(workspace_bytes)}, KV cache for "
            f"{min_tokens} tokens {format_bytes(min_blocks * block_bytes)}, reserve {format_bytes(reserve)} at "
            f"utilization {utilization:.2f}); {format_bytes(free_bytes)} of {format_bytes(total_bytes)} is free "
            "after loading the weights. Lower max_model_len, use a smaller quantization or another GPU.",
            needed_bytes=needed, device=device,
        )
    return MemoryPlan(
        device=device, weight_bytes=weight_bytes, workspace_bytes=workspace_bytes, reserve_bytes=reserve,
        block_bytes=block_bytes, num_blocks=min(budget // block_bytes - 1, max_useful_blocks), total_bytes=total_bytes,
    )


def check_host_memory(*, weight_bytes: int, kv_bytes: int, workspace_bytes: int, available_bytes: int | None) -> None:
    """Before loading on the CPU: raise if weights, KV cache and workspace together exceed
    the RAM available now, instead of being killed by the kernel's OOM killer halfway."""
    needed = weight_bytes + kv_bytes + workspace_bytes
    if available_bytes is not None and needed > available_bytes:
        raise DeviceOutOfMemoryError(
            f"the model does not fit in RAM: it needs about {format_bytes(needed)} (weights "
            f"{format_bytes(weight_bytes)}, KV cache {format_bytes(kv_bytes)}, activation workspace "
            f"{format_bytes(workspace_bytes)}), {format_bytes(available_bytes)} is available. Use a smaller "
            "quantization, weight_format=quantized, a smaller kv_cache_memory or max_num_batched_tokens.",
            needed_bytes=needed, device="cpu",
        )


def plan_cpu_kv_cache(
    *,
    kv_cache_memory: int,
    weight_bytes: int,
    workspace_bytes: int,
    block_bytes: int,
    max_useful_blocks: int,
) -> MemoryPlan:
    """On the CPU the KV pool is a fixed budget (``kv_cache_memory``) in host RAM."""
    blocks = min(kv_cache_memory // block_bytes - 1, max_useful_blocks)
    if blocks < 1:
        raise ConfigError(
            f"KV cache memory {format_bytes(kv_cache_memory)} is smaller than one block ({format_bytes(block_bytes)})",
            param="kv_cache_memory",
        )
    return MemoryPlan(
        device="cpu", weight_bytes=weight_bytes, workspace_bytes=workspace_bytes, reserve_bytes=0,
        block_bytes=block_bytes, num_blocks=blocks, total_bytes=None,
    )


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers, each storage counted once (tied weights)."""
    seen: set[int] = set()
    total = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total
