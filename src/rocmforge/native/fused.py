"""The fused small ops of a decoder layer on the CPU, with the interface of
:mod:`rocmforge.kernels.fused` (:meth:`LlamaForCausalLM.use_fused_kernels
<rocmforge.models.llama.LlamaForCausalLM.use_fused_kernels>` takes either module), over the
native operators of ``csrc/layer_ops.cpp``; and :func:`decoder_layer`, a whole layer of a
decode step in one call (``csrc/decoder_layer.cpp``). fp32 only, as the CPU computes; the
references are the torch ops they replace (tests/native/test_layer_ops.py) and, for the
layer, the module-by-module path it shortcuts (tests/native/test_decoder_layer.py)."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import torch

from rocmforge.attention.metadata import AttentionMetadata
from rocmforge.native import ops as _ops
from rocmforge.quant.gguf_linear import GGUFLinear

if TYPE_CHECKING:
    from rocmforge.models.llama import DecoderLayer

_layer_operands: weakref.WeakKeyDictionary[Any, tuple[Any, ...] | None] = weakref.WeakKeyDictionary()


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


def _operands(layer: DecoderLayer) -> tuple[Any, ...] | None:
    """The layer's weights as ``decoder_layer`` takes them, or None where a projection is
    not on the native kernels (then the layer runs module by module)."""
    if layer not in _layer_operands:
        attn, mlp = layer.self_attn, layer.mlp
        projections = [p for p in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
                       if isinstance(p, GGUFLinear) and p.kernels == "native"]
        if len(projections) != 4:
            _layer_operands[layer] = None
        else:
            qkv, o, gate_up, down = (p.native_operands() for p in projections)
            _layer_operands[layer] = (
                layer.input_layernorm.weight, layer.post_attention_layernorm.weight, layer.input_layernorm.eps,
                *qkv, attn.qkv_proj.bias, *o, *gate_up, *down,
            )
    return _layer_operands[layer]


def decoder_layer(
    layer: DecoderLayer,
    x: torch.Tensor,
    residual: torch.Tensor | None,
    rotation: tuple[torch.Tensor, torch.Tensor],
    metadata: AttentionMetadata,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``layer(x, residual, rotation, metadata)`` of a decode step (one token per sequence)
    as one native call; None where this step or layer is not one it runs (prefill chunks,
    mixed batches, another attention backend, non-native projections, other dtypes): the
    caller runs the modules."""
    attn = layer.self_attn
    if (attn.backend.name != "native" or metadata.max_query_len != 1 or x.shape[0] != metadata.num_seqs or x.dtype != torch.float32
            or attn.k_cache is None or attn.v_cache is None or attn.k_cache.dtype != torch.float32):
        return None
    operands = _operands(layer)
    if operands is None:
        return None
    input_norm, post_norm, eps, qkv, qkv_types, bias, o, o_types, gate_up, gate_up_types, down, down_types = operands
    cos, sin = rotation
    delta, stream = _native().decoder_layer(
        x, residual, input_norm, post_norm, eps, qkv, qkv_types, bias, o, o_types, gate_up, gate_up_types,
        down, down_types, cos, sin, attn.k_cache, attn.v_cache, metadata.slot_mapping, metadata.block_tables,
        metadata.seq_lens, attn.num_heads, attn.scale,
    )
    return delta, stream
