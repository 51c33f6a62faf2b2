"""Fused small ops of the decoder layer: RMSNorm (+ residual add), RoPE + KV-cache write,
SiLU-and-mul. Each is one Triton kernel with its launch wrapper, and the plain torch
reference it is tested against sits next to it (``*_reference``, built from the code the
model runs today: :mod:`rocmforge.models.layers` and :mod:`rocmforge.attention.torch_ref`).

In: activations from the model's forward pass (``[T, ...]`` rows, T tokens of the step),
the layer's weights, and for RoPE the runner's KV cache tensors and slot mapping. Out: new
tensors allocated here (normalised rows, the residual sum, rotated q, ``silu(gate) * up``);
the only thing written in place is the KV cache, at the slots the caller names. Inputs are
never modified. The caller (the model) owns every tensor passed in; the runner owns the
cache. This module imports Triton: import it only where
:func:`rocmforge.kernels.triton_available` holds, and call the fast paths on tensors whose
device passes :func:`rocmforge.kernels.kernels_usable` (the wrappers check and raise
``ValueError`` otherwise).

What each fusion saves (``[T, n]`` passes over device memory; launches):

* ``rms_norm(x, w, eps, residual=r)``: unfused, ``x + r`` is one kernel (2 reads, 1
  write) and the norm reads the sum again (in half precision ``layers.RMSNorm`` is ~6
  more elementwise kernels: upcast, square, mean, scale, downcast, weight, each a pass).
  Fused: one launch reading x and r once, writing the sum and the output (2 reads,
  2 writes); versus the fp32 path's single ``F.rms_norm`` it saves the add's launch and
  one read of the sum.
* ``apply_rotary_and_write_kv``: unfused, ``apply_rotary`` is ~10 kernels over
  ``[T, H + KVH, D]`` (upcast, four products, two sums, stack, downcast, plus copies),
  then ``write_kv`` casts and scatters k and v (two more passes each). Fused: one launch
  that reads q, k, v once from the QKV projection's output, writes rotated q once and
  scatters k, v straight into the cache in the cache's dtype; no intermediate of any size.
* ``silu_and_mul``: unfused, ``F.silu(gate)`` (1 read, 1 write of ``[T, I]``) then
  ``* up`` (2 reads, 1 write): two launches, three reads, two writes. Fused: one launch,
  two reads, one write.

Fewer launches also means fewer nodes in each captured CUDA graph.

All arithmetic is fp32 inside the kernels; results are rounded to the output dtype once
(``rms_norm`` in half precision rounds twice, as ``layers.RMSNorm`` does). Floating-point
contraction into FMAs is disabled at launch so that products and sums round as torch's
separate elementwise kernels do (the kernels are memory-bound: FMA buys nothing here).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import nn

from rocmforge.attention.torch_ref import write_kv
from rocmforge.kernels import kernels_usable
from rocmforge.models.layers import RMSNorm, apply_rotary

MAX_FUSED_ROW = 65536
"""Largest row (hidden size) ``rms_norm`` keeps in one program's registers."""
_SILU_BLOCK = 1024
"""Columns of ``[T, I]`` per ``silu_and_mul`` program (a row is split into blocks)."""
_ROPE_TILE = 2048
"""Elements (heads x head_dim) per ``apply_rotary_and_write_kv`` program."""


def _check_usable(*tensors: torch.Tensor) -> None:
    device = tensors[0].device
    if any(t.device != device for t in tensors):
        raise ValueError(f"all tensors must be on one device, got {sorted({str(t.device) for t in tensors})}")
    if not kernels_usable(device):
        raise ValueError(
            f"the Triton kernels cannot run on {device} here (a GPU with Triton, or the CPU under "
            "TRITON_INTERPRET=1, is needed); use the *_reference functions instead"
        )


def _check_floating(name: str, t: torch.Tensor) -> None:
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _num_warps(block: int) -> int:
    """Warps for a program holding ``block`` elements of one row (4 up to 2K, then 8, 16)."""
    if block >= 8192:
        return 16
    return 8 if block >= 2048 else 4


# --------------------------------------------------------------------------------------
# RMSNorm, optionally fused with the residual add
# --------------------------------------------------------------------------------------


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    x_row_stride,
    res_ptr,
    res_row_stride,
    sum_ptr,
    out_ptr,
    w_ptr,
    n_cols,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    ROUND_BEFORE_WEIGHT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # One program per row; the row (BLOCK >= n_cols, masked) stays in registers.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # The sum rounds to the input dtype, as the unfused ``x = x + h`` does.
        r = tl.load(res_ptr + row * res_row_stride + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * n_cols + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    y = xf * rstd
    if ROUND_BEFORE_WEIGHT:  # half precision: layers.RMSNorm rounds, then scales
        y = y.to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, (y * w).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim of ``x [..., n]`` with ``weight [n]``, as ``layers.RMSNorm``.

    Without ``residual``: returns the normalised rows. With ``residual`` (same shape and
    dtype as x): vLLM's fused_add_rms_norm — ``s = x + residual`` rounded to x's dtype,
    returns ``(rms_norm(s), s)``. Out of place: both results are new contiguous tensors and
    neither input is modified (no aliasing for the caller to reason about; the traffic is
    the same as vLLM's in-place variant). Output dtype is ``promote(x.dtype, weight.dtype)``,
    as the reference's. Statistics in fp32; for fp16/bf16 the normalised row is rounded to
    x's dtype before the weight multiplies it (the order of ``layers.RMSNorm``).
    """
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dim, got shape {tuple(x.shape)}")
    n = x.shape[-1]
    if weight.shape != (n,):
        raise ValueError(f"weight must have shape ({n},) to match x {tuple(x.shape)}, got {tuple(weight.shape)}")
    if n > MAX_FUSED_ROW:
        raise ValueError(f"hidden size {n} exceeds the fused row limit {MAX_FUSED_ROW}")
    _check_floating("x", x)
    _check_floating("weight", weight)
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(
            f"residual must match x (shape {tuple(x.shape)}, {x.dtype}), "
            f"got shape {tuple(residual.shape)}, {residual.dtype}"
        )
    _check_usable(x, weight, *([] if residual is None else [residual]))

    rows = _rows(x)
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    new_residual = torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else None
    if rows.shape[0] > 0:
        # Without a residual the kernel never touches its residual pointers: x and out stand in.
        res_rows = _rows(residual) if residual is not None else rows
        block = triton.next_power_of_2(n)
        _rms_norm_kernel[(rows.shape[0],)](
            rows,
            rows.stride(0),
            res_rows,
            res_rows.stride(0),
            new_residual if new_residual is not None else out,
            out,
            weight.contiguous(),
            n,
            float(eps),
            HAS_RESIDUAL=residual is not None,
            ROUND_BEFORE_WEIGHT=x.dtype != torch.float32,
            BLOCK=block,
            num_warps=_num_warps(block),
            enable_fp_fusion=False,
        )
    if new_residual is None:
        return out
    return out, new_residual


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x [..., n]`` as ``[rows, n]`` with unit column stride (a view where possible)."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(1) == 1 else rows.contiguous()


def rms_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """:func:`rms_norm` in plain torch: the model's ``layers.RMSNorm`` (and ``x + residual``)."""
    norm = RMSNorm(weight.shape[0], eps)
    norm.weight = nn.Parameter(weight, requires_grad=False)
    if residual is None:
        return norm(x)
    total = x + residual
    return norm(total), total


# --------------------------------------------------------------------------------------
# RoPE on q and k, k and v into the paged KV cache
# --------------------------------------------------------------------------------------


@triton.jit
def _rotary_write_kv_kernel(
    qk_ptr,
    qk_stride_t,
    qk_stride_h,
    qk_stride_d,
    v_ptr,
    v_stride_t,
    v_stride_h,
    v_stride_d,
    cos_ptr,
    sin_ptr,
    cs_stride_t,
    cs_stride_d,
    q_out_ptr,
    k_cache_ptr,
    v_cache_ptr,
    cache_stride_slot,
    cache_stride_h,
    cache_stride_d,
    slot_ptr,
    slot_stride,
    num_heads,
    num_kv_heads,
    head_dim,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Program (t, g) handles token t and a block of BLOCK_H "virtual heads" of the row
    #   [ q_0 .. q_{H-1} | k_0 .. k_{KVH-1} | v_0 .. v_{KVH-1} ]   (H + 2 KVH heads, D each)
    # as a [BLOCK_H, BLOCK_D] tile, loaded and stored along D (coalesced, vectorised). For the
    # rotation the tile is viewed as [BLOCK_H, BLOCK_D / 2, 2]: the interleaved pair
    # (x[2i], x[2i+1]) is the last axis, split into a and b. q and k heads rotate; v passes.
    t = tl.program_id(0).to(tl.int64)
    heads = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H))[:, None]  # [BLOCK_H, 1]
    d = tl.arange(0, BLOCK_D)[None, :]  # [1, BLOCK_D]
    d_ok = d < head_dim
    is_q = heads < num_heads
    is_k = (heads >= num_heads) & (heads < num_heads + num_kv_heads)
    is_v = (heads >= num_heads + num_kv_heads) & (heads < num_heads + 2 * num_kv_heads)
    rotate = is_q | is_k
    v_head = heads - num_heads - num_kv_heads

    x_qk = tl.load(qk_ptr + t * qk_stride_t + heads * qk_stride_h + d * qk_stride_d, mask=rotate & d_ok, other=0.0)
    x_v = tl.load(v_ptr + t * v_stride_t + v_head * v_stride_h + d * v_stride_d, mask=is_v & d_ok, other=0.0)
    x = tl.where(rotate, x_qk, x_v).to(tl.float32)
    a, b = tl.split(tl.reshape(x, [BLOCK_H, BLOCK_D // 2, 2]))  # [BLOCK_H, BLOCK_D / 2] each

    pairs = tl.arange(0, BLOCK_D // 2)
    cos = tl.load(cos_ptr + t * cs_stride_t + pairs * cs_stride_d, mask=2 * pairs < head_dim, other=0.0)
    sin = tl.load(sin_ptr + t * cs_stride_t + pairs * cs_stride_d, mask=2 * pairs < head_dim, other=0.0)
    cos = cos.to(tl.float32)[None, :]
    sin = sin.to(tl.float32)[None, :]
    out_a = tl.where(rotate, a * cos - b * sin, a)
    out_b = tl.where(rotate, b * cos + a * sin, b)
    # Round to the activations' dtype first (apply_rotary's result), then to the cache's.
    y = tl.reshape(tl.join(out_a, out_b), [BLOCK_H, BLOCK_D]).to(qk_ptr.dtype.element_ty)

    tl.store(q_out_ptr + (t * num_heads + heads) * head_dim + d, y, mask=is_q & d_ok)

    slot = tl.load(slot_ptr + t * slot_stride).to(tl.int64)
    if slot >= 0:  # slot -1: a padding token, nothing is written
        k_row = k_cache_ptr + slot * cache_stride_slot + (heads - num_heads) * cache_stride_h + d * cache_stride_d
        tl.store(k_row, y.to(k_cache_ptr.dtype.element_ty), mask=is_k & d_ok)
        v_row = v_cache_ptr + slot * cache_stride_slot + v_head * cache_stride_h + d * cache_stride_d
        tl.store(v_row, y.to(v_cache_ptr.dtype.element_ty), mask=is_v & d_ok)


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
    """``apply_rotary`` on q and k, then ``write_kv`` of k and v, in one launch.

    ``qk [T, H + KVH, D]`` and ``v [T, KVH, D]`` come straight from the fused QKV
    projection (any strides, e.g. column slices of ``[T, (H + 2 KVH) D]``); ``num_heads``
    is H. ``cos``/``sin`` are ``RotaryEmbedding``'s ``[T, 1, D/2]``. The interleaved pairs
    ``(x[2i], x[2i+1])`` of every q and k head rotate in fp32 and round to qk's dtype
    (bit-for-bit ``apply_rotary``). Returns rotated q as a new contiguous ``[T, H, D]``.

    Rotated k and v go to the slots ``slot_mapping [T]`` names in ``k_cache``/``v_cache``
    (``[num_blocks, block_size, KVH, D]``, rows of their ``[-1, KVH, D]`` view; k is
    rounded to qk's dtype, then to the cache's, as the unfused path does). A slot of -1
    marks a padding token (CUDA-graph batch padding): its k and v are not written. Other
    slots must be distinct and in range (not checked: that would synchronise the host).
    Rotated k is not returned: attention reads it from the cache, and returning it would
    cost an extra ``[T, KVH, D]`` write.
    """
    if qk.dim() != 3 or v.dim() != 3:
        raise ValueError(f"qk and v must be [T, heads, head_dim], got {tuple(qk.shape)} and {tuple(v.shape)}")
    tokens, qk_heads, head_dim = qk.shape
    num_kv_heads = qk_heads - num_heads
    if num_heads < 1 or num_kv_heads < 1:
        raise ValueError(f"qk has {qk_heads} heads: cannot hold num_heads={num_heads} q heads and >= 1 k head")
    if v.shape != (tokens, num_kv_heads, head_dim):
        raise ValueError(f"v must be [{tokens}, {num_kv_heads}, {head_dim}] to match qk, got {tuple(v.shape)}")
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for interleaved RoPE, got {head_dim}")
    half = head_dim // 2
    for name, t in (("cos", cos), ("sin", sin)):
        if t.shape != (tokens, 1, half):
            raise ValueError(f"{name} must be [{tokens}, 1, {half}], got {tuple(t.shape)}")
    if cos.stride() != sin.stride():
        raise ValueError("cos and sin must have the same strides")
    cache_shape = (num_kv_heads, head_dim)
    if k_cache.dim() != 4 or tuple(k_cache.shape[2:]) != cache_shape or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"k_cache and v_cache must both be [num_blocks, block_size, {num_kv_heads}, {head_dim}], "
            f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if slot_mapping.shape != (tokens,) or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"slot_mapping must be int32/int64 [{tokens}], got {slot_mapping.dtype} {tuple(slot_mapping.shape)}"
        )
    if v.dtype != qk.dtype:
        raise ValueError(f"qk and v must share a dtype, got {qk.dtype} and {v.dtype}")
    for name, t in (("qk", qk), ("cos", cos), ("sin", sin), ("k_cache", k_cache), ("v_cache", v_cache)):
        _check_floating(name, t)
    _check_usable(qk, v, cos, sin, k_cache, v_cache, slot_mapping)
    k_slots = _slot_rows(k_cache)
    v_slots = _slot_rows(v_cache)
    if k_slots.stride() != v_slots.stride():
        raise ValueError("k_cache and v_cache must have the same strides")

    q = torch.empty((tokens, num_heads, head_dim), dtype=qk.dtype, device=qk.device)
    if tokens == 0:
        return q
    block_d = triton.next_power_of_2(head_dim)
    total_heads = num_heads + 2 * num_kv_heads
    block_h = min(triton.next_power_of_2(total_heads), max(1, _ROPE_TILE // block_d))
    _rotary_write_kv_kernel[(tokens, triton.cdiv(total_heads, block_h))](
        qk,
        *qk.stride(),
        v,
        *v.stride(),
        cos,
        sin,
        cos.stride(0),
        cos.stride(2),
        q,
        k_slots,
        v_slots,
        *k_slots.stride(),
        slot_mapping,
        slot_mapping.stride(0),
        num_heads,
        num_kv_heads,
        head_dim,
        BLOCK_H=block_h,
        BLOCK_D=block_d,
        num_warps=4,
        enable_fp_fusion=False,
    )
    return q


def _slot_rows(cache: torch.Tensor) -> torch.Tensor:
    """The ``[num_slots, KVH, D]`` view ``write_kv`` indexes (no copy: the cache is written)."""
    try:
        return cache.view(-1, cache.shape[2], cache.shape[3])
    except RuntimeError as err:
        raise ValueError(f"the KV cache must be viewable as [slots, kv_heads, head_dim]: {err}") from err


def apply_rotary_and_write_kv_reference(
    qk: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    num_heads: int,
) -> torch.Tensor:
    """:func:`apply_rotary_and_write_kv` in plain torch: ``apply_rotary`` then ``write_kv``
    of the tokens whose slot is not -1 (the mask synchronises the host; fine for a reference)."""
    rotated = apply_rotary(qk, (cos, sin))
    q, k = rotated.split([num_heads, qk.shape[1] - num_heads], dim=1)
    keep = slot_mapping >= 0
    write_kv(k[keep], v[keep], k_cache, v_cache, slot_mapping[keep].long())
    return q.contiguous()


# --------------------------------------------------------------------------------------
# SiLU-and-mul
# --------------------------------------------------------------------------------------


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,
    x_row_stride,
    x_col_stride,
    out_ptr,
    n_cols,
    BLOCK: tl.constexpr,
):
    # Program (t, c): columns [c BLOCK, (c + 1) BLOCK) of row t; gate is x[t, :n], up x[t, n:].
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    base = x_ptr + row * x_row_stride
    gate = tl.load(base + cols * x_col_stride, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(base + (cols + n_cols) * x_col_stride, mask=mask, other=0.0).to(tl.float32)
    y = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * n_cols + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up [..., 2I]`` (gate the first half) -> new ``[..., I]``.

    Computed in fp32 and rounded once to the input dtype. The reference
    ``F.silu(gate) * up`` in fp16/bf16 rounds silu's result before multiplying, so the two
    may differ by one unit in the last place of the output dtype (fp32: rounding only).
    """
    if gate_up.dim() == 0 or gate_up.shape[-1] == 0 or gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up's last dim must be even and non-zero, got shape {tuple(gate_up.shape)}")
    _check_floating("gate_up", gate_up)
    _check_usable(gate_up)
    inter = gate_up.shape[-1] // 2
    out = torch.empty((*gate_up.shape[:-1], inter), dtype=gate_up.dtype, device=gate_up.device)
    rows = gate_up.reshape(-1, 2 * inter)
    if rows.shape[0] > 0:
        block = min(triton.next_power_of_2(inter), _SILU_BLOCK)
        _silu_and_mul_kernel[(rows.shape[0], triton.cdiv(inter, block))](
            rows,
            rows.stride(0),
            rows.stride(1),
            out,
            inter,
            BLOCK=block,
            num_warps=4,
            enable_fp_fusion=False,
        )
    return out


def silu_and_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """:func:`silu_and_mul` in plain torch, as ``llama.MLP`` computes it."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up
