"""Matmul on GGUF-quantized weights that stay in their file layout: ``x @ dequantize(w).T``.

In: activations ``x`` ``[M, K]`` (float32, float16 or bfloat16, any strides) and one weight
tensor's raw GGUF bytes ``w``, a uint8 ``[N, row_bytes]`` tensor (N output rows of K
elements each, in GGUF block layout, exactly the bytes of the file: loading is a memcpy).
Out: ``[M, N]`` in ``x.dtype``, either new or written into a caller's ``out`` (which may be
a column slice of a wider output). The caller owns all three tensors; nothing here keeps
state besides Triton's compiled-kernel cache and each GPU's multiprocessor count.

Every weight byte is read from DRAM once per M tile (once per matmul for decode-sized M;
the M tiles of a prefill share one weight strip through L2) and decoded in registers: the two bytes of each fp16 scale are assembled as
``(hi << 8) | lo`` and bitcast, codes are unpacked with shifts and masks, and the decoded
fp32 tile meets the activations without ever reaching memory.

Supported types (block layouts byte by byte in :mod:`rocmforge.gguf.dequant`)::

    type   block elems  block bytes  bits/weight   rows need K % ...
    Q8_0        32           34         8.5            32
    Q4_0        32           18         4.5            32
    Q4_1        32           20         5.0            32
    Q5_0        32           22         5.5            32
    Q5_1        32           24         6.0            32
    Q4_K       256          144         4.5           256
    Q5_K       256          176         5.5           256
    Q6_K       256          210         6.5625        256

One ``@triton.jit`` decode helper per type maps (row pointers, first column ``k0``) to the
fp32 tile ``W[n, k0 : k0 + BLOCK_K]``, ``[BLOCK_N, BLOCK_K]``; both kernels take it as a
constexpr argument, so each (kernel, type) pair compiles to its own specialised code:

* ``_gemv_kernel`` (decode, ``M <= GEMV_MAX_M = 4``): a program owns a strip of
  ``BLOCK_N`` output rows and ``BLOCK_M`` activation rows, walks its share of K, multiplies
  the decoded tile by the activation rows in fp32 (a ``[BLOCK_M, BLOCK_N, BLOCK_K]``
  broadcast product) and reduces over K in registers. Beyond four rows that product
  outgrows the registers and a 16-row ``tl.dot`` tile costs no more weight traffic, hence
  the threshold.
* ``_tiled_kernel`` (prefill and batched decode): a program per ``BLOCK_M x BLOCK_N`` output
  tile decodes the weight tile, casts it to the activation dtype (kept fp32 for fp32
  activations, with an IEEE fp32 ``tl.dot``, as torch does by default) and accumulates
  ``tl.dot`` in fp32. Consecutive programs share one weight strip (M tiles vary fastest),
  so its bytes come from L2 after the first read.

Split-K: when the output tiles alone would leave most of the GPU's multiprocessors idle
(small N, few rows; see ``_auto_split_k``), K is cut into ``split_k`` ranges of whole K tiles; each writes fp32 partial
sums into a ``[split_k, M, N]`` workspace that one torch reduction sums into ``out``
(deterministic, unlike fp32 atomics). Nothing here synchronises with the host.

Indexing inside a decode helper, for a tile starting at column ``k0`` (a multiple of
``BLOCK_K``, itself a multiple of the sub-block width ``G``: 32, or 16 for Q6_K)::

    row n:  | block 0 | block 1 | ... |            row_ptr[n] = w + n * stride_wn
    tile:   columns k0 .. k0 + BLOCK_K - 1  =  sub-blocks  sub = k0 / G + 0 .. BLOCK_K / G - 1
    sub-block ``sub`` lies in block ``sub // (block elems / G)`` at byte ``block * block_bytes``;
    the helper builds ``[BLOCK_N, BLOCK_K / G]`` tiles of scales and a
    ``[BLOCK_N, BLOCK_K / G, G]`` tile of codes, then reshapes to ``[BLOCK_N, BLOCK_K]``.

Sub-blocks at or past ``K`` (a ragged last tile) and rows at or past ``N`` load as zero
bytes (scale 0, so the value is 0) and are never stored.

The reference is :func:`reference_quant_matmul` (dequantize with
:func:`rocmforge.gguf.dequant.dequantize`, then a float32 matmul);
``tests/kernels/test_quant_matmul.py`` compares the two.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from rocmforge.gguf.dequant import dequantize
from rocmforge.kernels import interpreter_active, kernels_usable

__all__ = [
    "GEMV_MAX_M",
    "SUPPORTED_TYPES",
    "GemvConfig",
    "TiledConfig",
    "quant_matmul",
    "reference_quant_matmul",
]

_T = GGMLQuantizationType


# --- field helpers --------------------------------------------------------------------------


@triton.jit
def _load_f16(ptr, mask):
    """The little-endian fp16 at ``ptr`` (bytes ``ptr``, ``ptr + 1``) as fp32."""
    lo = tl.load(ptr, mask=mask, other=0).to(tl.uint16)
    hi = tl.load(ptr + 1, mask=mask, other=0).to(tl.uint16)
    return ((hi << 8) | lo).to(tl.float16, bitcast=True).to(tl.float32)


# --- decode helpers, one per type -----------------------------------------------------------
# Shared signature: (row_ptr [BLOCK_N] uint8 pointers to each row's first byte, k0 the tile's
# first column, n_mask [BLOCK_N] rows in range, K the row length, BLOCK_N, BLOCK_K) ->
# fp32 [BLOCK_N, BLOCK_K]. Arithmetic follows dequant.py step for step.


@triton.jit
def _block32_tile(row_ptr, k0, n_mask, K, BLOCK_BYTES: tl.constexpr, BLOCK_K: tl.constexpr):
    """Common indexing of the 32-element block types: per-block pointers ``[BN, NB]``, the
    validity mask of each (row, block), and the column in the block ``j`` ``[32]``."""
    blocks = k0 // 32 + tl.arange(0, BLOCK_K // 32)
    valid = n_mask[:, None] & (blocks < K // 32)[None, :]
    blk = row_ptr[:, None] + (blocks * BLOCK_BYTES)[None, :]
    return blk, valid, tl.arange(0, 32)


@triton.jit
def _nibble(blk, valid, qs: tl.constexpr, j):
    """4-bit code of element ``j`` of 32: byte ``qs + j % 16``, high nibble for ``j >= 16``."""
    ptr = blk[:, :, None] + (qs + j % 16)[None, None, :]
    byte = tl.load(ptr, mask=valid[:, :, None], other=0).to(tl.int32)
    return (byte >> ((j // 16) * 4)[None, None, :]) & 0x0F


@triton.jit
def _bit4(blk, valid, qh: tl.constexpr, j):
    """Bit ``j`` of the little-endian uint32 at byte ``qh``, as value 16 (bit 4 of the code)."""
    ptr = blk[:, :, None] + (qh + j // 8)[None, None, :]
    byte = tl.load(ptr, mask=valid[:, :, None], other=0).to(tl.int32)
    return ((byte >> (j % 8)[None, None, :]) & 0x01) << 4


@triton.jit
def _decode_q8_0(row_ptr, k0, n_mask, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    blk, valid, j = _block32_tile(row_ptr, k0, n_mask, K, 34, BLOCK_K)
    d = _load_f16(blk, valid)
    byte = tl.load(blk[:, :, None] + (2 + j)[None, None, :], mask=valid[:, :, None], other=0)
    q = byte.to(tl.int8, bitcast=True).to(tl.float32)
    return tl.reshape(q * d[:, :, None], (BLOCK_N, BLOCK_K))


@triton.jit
def _decode_q4_0(row_ptr, k0, n_mask, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    blk, valid, j = _block32_tile(row_ptr, k0, n_mask, K, 18, BLOCK_K)
    d = _load_f16(blk, valid)
    q = _nibble(blk, valid, 2, j) - 8
    return tl.reshape(d[:, :, None] * q.to(tl.float32), (BLOCK_N, BLOCK_K))


@triton.jit
def _decode_q4_1(row_ptr, k0, n_mask, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    blk, valid, j = _block32_tile(row_ptr, k0, n_mask, K, 20, BLOCK_K)
    d = _load_f16(blk, valid)
    m = _load_f16(blk + 2, valid)
    q = _nibble(blk, valid, 4, j)
    return tl.reshape(d[:, :, None] * q.to(tl.float32) + m[:, :, None], (BLOCK_N, BLOCK_K))


@triton.jit
def _decode_q5_0(row_ptr, k0, n_mask, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    blk, valid, j = _block32_tile(row_ptr, k0, n_mask, K, 22, BLOCK_K)
    d = _load_f16(blk, valid)
    q = (_nibble(blk, valid, 6, j) | _bit4(blk, valid, 2, j)) - 16
    return tl.reshape(d[:, :, None] * q.to(tl.float32), (BLOCK_N, BLOCK_K))


@triton.jit
def _decode_q5_1(row_ptr, k0, n_mask, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    blk, valid, j = _block32_tile(row_ptr, k0, n_mask, K, 24, BLOCK_K)
    d = _load_f16(blk, valid)
    m = _load_f16(blk + 2, valid)
    q = _nibble(blk, valid, 8, j) | _bit4(blk, valid, 4, j)
    return tl.reshape(d[:, :, None] * q.to(tl.float32) + m[:, :, None], (BLOCK_N, BLOCK_K))


@triton.jit
def _k_quant_tile(row_ptr, k0, n_mask, K, BLOCK_BYTES: tl.constexpr, BLOCK_K: tl.constexpr):
    """Q4_K/Q5_K indexing by 32-element sub-blocks: per-sub-block pointers to their
    super-block ``[BN, NS]``, validity, sub-block-in-super-block ``s`` ``[NS]`` (0..7)."""
    subs = k0 // 32 + tl.arange(0, BLOCK_K // 32)
    valid = n_mask[:, None] & (subs < K // 32)[None, :]
    blk = row_ptr[:, None] + ((subs // 8) * BLOCK_BYTES)[None, :]
    return blk, valid, subs % 8


@triton.jit
def _k_scale_offset(blk, valid, s):
    """``d * scale`` and ``dmin * min`` of sub-block ``s`` from bytes 0..15 of a Q4_K/Q5_K
    super-block (12-byte scale field at byte 4; see dequant.py for its bit layout)."""
    d = _load_f16(blk, valid)
    dmin = _load_f16(blk + 2, valid)
    i = (s % 4)[None, :]
    lo_sc = tl.load(blk + 4 + i, mask=valid, other=0).to(tl.int32)
    lo_m = tl.load(blk + 8 + i, mask=valid, other=0).to(tl.int32)
    hi = tl.load(blk + 12 + i, mask=valid, other=0).to(tl.int32)
    upper = (s >= 4)[None, :]
    sc = tl.where(upper, (hi & 0x0F) | ((lo_sc >> 2) & 0x30), lo_sc & 0x3F)
    mn = tl.where(upper, (hi >> 4) | ((lo_m >> 2) & 0x30), lo_m & 0x3F)
    return d * sc.to(tl.float32), dmin * mn.to(tl.float32)


@triton.jit
def _k_nibble(blk, valid, s, qs: tl.constexpr):
    """Low 4 bits of element ``32 s + j``: nibble ``s % 2`` of byte ``qs + 32 (s // 2) + j``."""
    offs = (qs + 32 * (s // 2))[:, None] + tl.arange(0, 32)[None, :]
    byte = tl.load(blk[:, :, None] + offs[None, :, :], mask=valid[:, :, None], other=0)
    return (byte.to(tl.int32) >> (4 * (s % 2))[None, :, None]) & 0x0F


@triton.jit
def _decode_q4_k(row_ptr, k0, n_mask, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    blk, valid, s = _k_quant_tile(row_ptr, k0, n_mask, K, 144, BLOCK_K)
    scale, offset = _k_scale_offset(blk, valid, s)
    q = _k_nibble(blk, valid, s, 16).to(tl.float32)
    return tl.reshape(scale[:, :, None] * q - offset[:, :, None], (BLOCK_N, BLOCK_K))


@triton.jit
def _decode_q5_k(row_ptr, k0, n_mask, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    blk, valid, s = _k_quant_tile(row_ptr, k0, n_mask, K, 176, BLOCK_K)
    scale, offset = _k_scale_offset(blk, valid, s)
    # Bit 4 of element 32 s + j is bit s of qh byte j (qh at byte 16).
    ptr = blk[:, :, None] + (16 + tl.arange(0, 32))[None, None, :]
    qh = tl.load(ptr, mask=valid[:, :, None], other=0).to(tl.int32)
    q = _k_nibble(blk, valid, s, 48) | (((qh >> s[None, :, None]) & 0x01) << 4)
    w = scale[:, :, None] * q.to(tl.float32) - offset[:, :, None]
    return tl.reshape(w, (BLOCK_N, BLOCK_K))


@triton.jit
def _decode_q6_k(row_ptr, k0, n_mask, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # 16-element sub-blocks t (one int8 scale each); element i = 16 t + j of the super-block
    # sits in half c = i // 128 at r = i % 128:
    #   low 4 bits  = nibble r // 64 of ql byte 64 c + r % 64          (ql at byte 0)
    #   high 2 bits = bits 2 (r // 32) .. +1 of qh byte 32 c + r % 32   (qh at byte 128)
    subs = k0 // 16 + tl.arange(0, BLOCK_K // 16)
    valid = n_mask[:, None] & (subs < K // 16)[None, :]
    blk = row_ptr[:, None] + ((subs // 16) * 210)[None, :]
    t = subs % 16
    sc = tl.load(blk + 192 + t[None, :], mask=valid, other=0).to(tl.int8, bitcast=True)
    scale = _load_f16(blk + 208, valid) * sc.to(tl.float32)
    i = (16 * t)[:, None] + tl.arange(0, 16)[None, :]
    c = i // 128
    r = i % 128
    mask = valid[:, :, None]
    ql = tl.load(blk[:, :, None] + (64 * c + r % 64)[None, :, :], mask=mask, other=0)
    qh = tl.load(blk[:, :, None] + (128 + 32 * c + r % 32)[None, :, :], mask=mask, other=0)
    low = (ql.to(tl.int32) >> (4 * (r // 64))[None, :, :]) & 0x0F
    high = (qh.to(tl.int32) >> (2 * (r // 32))[None, :, :]) & 0x03
    q = (low | (high << 4)) - 32
    return tl.reshape(scale[:, :, None] * q.to(tl.float32), (BLOCK_N, BLOCK_K))


_DECODERS = {
    _T.Q8_0: _decode_q8_0,
    _T.Q4_0: _decode_q4_0,
    _T.Q4_1: _decode_q4_1,
    _T.Q5_0: _decode_q5_0,
    _T.Q5_1: _decode_q5_1,
    _T.Q4_K: _decode_q4_k,
    _T.Q5_K: _decode_q5_k,
    _T.Q6_K: _decode_q6_k,
}

SUPPORTED_TYPES: frozenset[GGMLQuantizationType] = frozenset(_DECODERS)

_ACTIVATION_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Columns per K tile must be a multiple of the widest sub-block (32) and a power of two.
_MIN_BLOCK_K = 32


# --- kernels --------------------------------------------------------------------------------


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, out_ptr,
    M, N, K, tiles_per_split,
    stride_xm, stride_xk, stride_wn, stride_os, stride_om, stride_on,
    DECODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """grid = (N tiles, split_k, M tiles): out[split, m, n] = sum over this split's K tiles
    of x[m, k] * W[n, k], reduced in fp32 registers."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask = offs_n < N
    m_mask = offs_m < M
    row_ptr = w_ptr + offs_n.to(tl.int64) * stride_wn
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm

    first = pid_s * tiles_per_split
    last = tl.minimum(first + tiles_per_split, tl.cdiv(K, BLOCK_K))
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for tile in range(first, last):
        k0 = tile * BLOCK_K
        w = DECODE(row_ptr, k0, n_mask, K, BLOCK_N, BLOCK_K)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_rows + offs_k[None, :] * stride_xk,
            mask=m_mask[:, None] & (offs_k < K)[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)

    out = out_ptr + pid_s * stride_os + offs_m.to(tl.int64)[:, None] * stride_om
    tl.store(
        out + offs_n[None, :] * stride_on,
        acc.to(out_ptr.dtype.element_ty),
        mask=m_mask[:, None] & n_mask[None, :],
    )


@triton.jit
def _tiled_kernel(
    x_ptr, w_ptr, out_ptr,
    M, N, K, tiles_per_split,
    stride_xm, stride_xk, stride_wn, stride_os, stride_om, stride_on,
    DECODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
):  # fmt: skip
    """grid = (M tiles, N tiles, split_k): one ``BLOCK_M x BLOCK_N`` tile of out[split]."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    row_ptr = w_ptr + offs_n.to(tl.int64) * stride_wn
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm

    first = pid_s * tiles_per_split
    last = tl.minimum(first + tiles_per_split, tl.cdiv(K, BLOCK_K))
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for tile in range(first, last):
        k0 = tile * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_rows + offs_k[None, :] * stride_xk,
            mask=m_mask[:, None] & (offs_k < K)[None, :],
            other=0.0,
        )
        w = DECODE(row_ptr, k0, n_mask, K, BLOCK_N, BLOCK_K).to(x.dtype)
        if DOT_IN_FP32:
            # Triton's interpreter multiplies bf16 operands as raw uint16 words; the fp32
            # products of the bf16-rounded operands are exact, so this is the same dot.
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)

    out = out_ptr + pid_s * stride_os + offs_m.to(tl.int64)[:, None] * stride_om
    tl.store(
        out + offs_n[None, :] * stride_on,
        acc.to(out_ptr.dtype.element_ty),
        mask=m_mask[:, None] & n_mask[None, :],
    )


# --- launch configuration -------------------------------------------------------------------

GEMV_MAX_M = 4
"""Largest M that ``quant_matmul`` sends to the GEMV kernel by default."""


@dataclass(frozen=True, slots=True)
class GemvConfig:
    """Launch parameters of the GEMV kernel. Block sizes are powers of two; ``block_k`` is
    at least 32. ``split_k=None`` picks a split that fills the device."""

    block_m: int = 4
    block_n: int = 32
    block_k: int = 128
    split_k: int | None = None
    num_warps: int = 4


@dataclass(frozen=True, slots=True)
class TiledConfig:
    """Launch parameters of the tiled ``tl.dot`` kernel (``block_m``, ``block_n`` >= 16)."""

    block_m: int = 64
    block_n: int = 64
    block_k: int = 64
    split_k: int | None = None
    num_warps: int = 4
    num_stages: int = 2


def _default_config(m: int) -> GemvConfig | TiledConfig:
    """First-guess tiles, to be tuned on hardware. GEMV: all M rows in one program, strips of
    32 output rows (16 with four activation rows, so the ``[BM, BN, BK]`` product stays at
    64 fp32 registers a thread with 4 warps). Tiled: M tiles of 16..128 rows, 64x64 output
    tiles up to 128x128 (8 warps) for prefill."""
    if m <= GEMV_MAX_M:
        block_m = triton.next_power_of_2(m)
        return GemvConfig(block_m=block_m, block_n=32 if block_m <= 2 else 16)
    block_m = min(max(triton.next_power_of_2(m), 16), 128)
    if block_m == 128:
        return TiledConfig(block_m=128, block_n=128, num_warps=8)
    return TiledConfig(block_m=block_m)


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    """Multiprocessors (SMs / CUs) of a GPU; 1 for the CPU interpreter."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _auto_split_k(programs: int, k_tiles: int, device: torch.device, waves: int) -> int:
    """Split K when the output tiles fill at most half of ``waves`` programs per
    multiprocessor, up to that target, keeping at least two K tiles per split (one tile
    per split would spend more on the reduction than it gains)."""
    target = waves * _multiprocessors(device)
    if 2 * programs > target:
        return 1
    return max(1, min(math.ceil(target / programs), k_tiles // 2))


def _check_block(name: str, value: int, minimum: int) -> None:
    if value < minimum or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= {minimum}, got {value}")


# --- public API -----------------------------------------------------------------------------


def _type_sizes(ggml_type: GGMLQuantizationType | int) -> tuple[GGMLQuantizationType, int, int]:
    """The type as an enum member (ValueError if unsupported), block elements, block bytes."""
    try:
        qtype = GGMLQuantizationType(ggml_type)
    except ValueError as exc:
        raise ValueError(f"unknown GGML tensor type {ggml_type!r}") from exc
    if qtype not in SUPPORTED_TYPES:
        supported = ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
        raise ValueError(f"quant_matmul does not support {qtype.name} (supported: {supported})")
    block_elements, block_bytes = GGML_QUANT_SIZES[qtype]
    return qtype, block_elements, block_bytes


def quant_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    ggml_type: GGMLQuantizationType | int,
    *,
    out: torch.Tensor | None = None,
    config: GemvConfig | TiledConfig | None = None,
) -> torch.Tensor:
    """``x @ dequantize(weight).T`` with the weight decoded on the fly.

    ``x``: ``[M, K]`` float32/float16/bfloat16. ``weight``: uint8 ``[N, row_bytes]``, each
    row K elements of ``ggml_type`` in GGUF block layout (unit stride along a row; rows may
    be strided). ``out``: optional ``[M, N]`` tensor of ``x.dtype`` on the same device, any
    strides (a column slice of a wider output works); it is returned. ``config`` forces a
    kernel and its tiles (``GemvConfig`` or ``TiledConfig``); by default ``M <= GEMV_MAX_M``
    takes the GEMV kernel and larger M the tiled one.

    Raises ValueError for an unsupported type, dtype, shape or config, and RuntimeError when
    the Triton kernels cannot run on the tensors' device.
    """
    qtype, block_elements, block_bytes = _type_sizes(ggml_type)
    if x.dtype not in _ACTIVATION_DTYPES:
        raise ValueError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
    m, k = x.shape
    if k == 0 or k % block_elements:
        raise ValueError(
            f"{qtype.name} needs K to be a positive multiple of {block_elements}, got K={k}"
        )
    if weight.dtype != torch.uint8 or weight.dim() != 2:
        raise ValueError(
            f"weight must be a uint8 [N, row_bytes] tensor, got {weight.dtype} "
            f"of shape {tuple(weight.shape)}"
        )
    n = weight.shape[0]
    expected_bytes = k // block_elements * block_bytes
    if weight.shape[1] != expected_bytes:
        raise ValueError(
            f"a {qtype.name} row of K={k} elements takes {expected_bytes} bytes, "
            f"weight rows have {weight.shape[1]}"
        )
    if weight.stride(1) != 1:
        raise ValueError("weight rows must be contiguous (unit stride along a row)")
    if weight.device != x.device:
        raise ValueError(f"x is on {x.device} but weight is on {weight.device}")
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    elif out.shape != (m, n) or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(
            f"out must be [{m}, {n}] {x.dtype} on {x.device}, got {tuple(out.shape)} "
            f"{out.dtype} on {out.device}"
        )
    if not kernels_usable(x.device):
        raise RuntimeError(f"the Triton kernels cannot run on {x.device} here")
    if m == 0 or n == 0:
        return out

    config = config if config is not None else _default_config(m)
    gemv = isinstance(config, GemvConfig)
    _check_block("block_m", config.block_m, 1 if gemv else 16)
    _check_block("block_n", config.block_n, 1 if gemv else 16)
    _check_block("block_k", config.block_k, _MIN_BLOCK_K)

    m_tiles = triton.cdiv(m, config.block_m)
    n_tiles = triton.cdiv(n, config.block_n)
    k_tiles = triton.cdiv(k, config.block_k)
    split_k = config.split_k
    if split_k is None:
        split_k = _auto_split_k(m_tiles * n_tiles, k_tiles, x.device, waves=4 if gemv else 1)
    if split_k < 1:
        raise ValueError(f"split_k must be >= 1, got {split_k}")
    tiles_per_split = triton.cdiv(k_tiles, split_k)
    split_k = triton.cdiv(k_tiles, tiles_per_split)  # no empty splits

    if split_k == 1:
        target, stride_os = out, 0
    else:
        target = torch.empty((split_k, m, n), dtype=torch.float32, device=x.device)
        stride_os = target.stride(0)
    stride_om, stride_on = target.stride()[-2:]
    args = (
        x, weight, target,
        m, n, k, tiles_per_split,
        x.stride(0), x.stride(1), weight.stride(0), stride_os, stride_om, stride_on,
        _DECODERS[qtype],
        config.block_m, config.block_n, config.block_k,
    )  # fmt: skip
    if gemv:
        _gemv_kernel[(n_tiles, split_k, m_tiles)](*args, num_warps=config.num_warps)
    else:
        _tiled_kernel[(m_tiles, n_tiles, split_k)](
            *args,
            "ieee" if x.dtype == torch.float32 else None,  # None: the backend's default
            x.dtype == torch.bfloat16 and interpreter_active(),
            num_warps=config.num_warps,
            num_stages=config.num_stages,
        )
    if split_k > 1:
        out.copy_(target.sum(dim=0))
    return out


def reference_quant_matmul(
    x: torch.Tensor, weight: torch.Tensor, ggml_type: GGMLQuantizationType | int
) -> torch.Tensor:
    """The slow, obvious version: dequantize the whole weight to float32, matmul in float32,
    round to ``x.dtype``."""
    qtype, block_elements, _ = _type_sizes(ggml_type)
    n = weight.shape[0]
    k = weight.shape[1] // GGML_QUANT_SIZES[qtype][1] * block_elements
    dense = dequantize(weight.reshape(-1), qtype, (n, k), torch.float32)
    return (x.to(torch.float32) @ dense.T).to(x.dtype)
