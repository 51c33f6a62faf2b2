"""The fused small ops of a decoder layer on the CPU, with the interface of
:mod:`rocmforge.kernels.fused` (:meth:`LlamaForCausalLM.use_fused_kernels
<rocmforge.models.llama.LlamaForCausalLM.use_fused_kernels>` takes either module), over the
native operators of ``csrc/layer_ops.cpp``. fp32 only, as the CPU computes; the references
are the torch ops they replace (tests/native/test_layer_ops.py)."""

from __future__ import annotations

from typing import Any

import torch

from rocmforge.native import ops as _ops


def _native() -> Any:
    native = _ops()
    if native is None:
        raise RuntimeError("native CPU kernels unavailable")
    return native


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, *, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``layers.RMSNorm``: the normalised rows, or with ``residual`` ``(norm(x + residual), x + residual)``."""
    out, total = _native().add_rms_norm(x, residual, weight, eps)
    return out if residual is None else (out, total)


def apply_rotary_and_write_kv(
    qk: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    num_heads: int,
) -> torch.Tensor:
    """RoPE on q and k (interleaved pairs), k and v written to their slots (-1: not
    written); returns rotated q ``[T, H, D]``."""
    return _native().rope_write_kv(qk, v, cos, sin, k_cache, v_cache, slot_mapping, num_heads)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of ``[..., 2 I]`` rows -> ``[..., I]``."""
    return _native().silu_mul(gate_up)
