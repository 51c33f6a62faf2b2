"""Decode GGUF quantized blocks into fp32 weight tiles inside a Triton kernel.

In: a tile's worth of one weight tensor's raw GGUF bytes, still in device memory in file
layout: ``row_ptr`` ``[BLOCK_N]`` uint8 pointers to the first byte of each row (row ``n``
holds ``K`` elements in GGUF blocks), the tile's first column ``k0``, the row mask
``n_mask`` ``[BLOCK_N]`` and ``K``. Out: the fp32 tile ``W[n, k0 : k0 + BLOCK_K]``,
``[BLOCK_N, BLOCK_K]``, in registers. Nothing here allocates, stores or keeps state: the
helpers are ``@triton.jit`` device functions that Triton inlines into the kernel calling
them; the caller owns the weight tensor and chooses the tile.

:data:`DECODERS` maps each supported :class:`gguf.GGMLQuantizationType` to its helper.
A kernel takes the helper as a ``tl.constexpr`` argument (``DECODE(row_ptr, k0, n_mask,
K, BLOCK_N, BLOCK_K)``), so every (kernel, type) pair compiles to its own specialised code.

Types (block layouts byte by byte in :mod:`rocmforge.gguf.dequant`)::

    type   block elems  block bytes  bits/weight   sub-block width G
    Q8_0        32           34         8.5            32
    Q4_0        32           18         4.5            32
    Q4_1        32           20         5.0            32
    Q5_0        32           22         5.5            32
    Q5_1        32           24         6.0            32
    Q4_K       256          144         4.5            32
    Q5_K       256          176         5.5            32
    Q6_K       256          210         6.5625         16

Decoding happens in registers, following ``dequant.py`` step for step: the two bytes of
each fp16 scale are assembled as ``(hi << 8) | lo`` and bitcast, codes are unpacked with
shifts and masks, and scales meet codes in fp32.

Indexing inside a decode helper, for a tile starting at column ``k0`` (a multiple of
``BLOCK_K``, itself a power of two and a multiple of :data:`MIN_BLOCK_K` = 32, so of every
sub-block width ``G``)::

    row n:  | block 0 | block 1 | ... |            row_ptr[n] = w + n * stride_wn
    tile:   columns k0 .. k0 + BLOCK_K - 1  =  sub-blocks  sub = k0 / G + 0 .. BLOCK_K / G - 1
    sub-block ``sub`` lies in block ``sub // (block elems / G)`` at byte ``block * block_bytes``;
    the helper builds ``[BLOCK_N, BLOCK_K / G]`` tiles of scales and a
    ``[BLOCK_N, BLOCK_K / G, G]`` tile of codes, then reshapes to ``[BLOCK_N, BLOCK_K]``.

Sub-blocks at or past ``K`` (a ragged last tile) and rows outside ``n_mask`` load as zero
bytes (scale 0, so the value is 0).

Tested through :mod:`rocmforge.kernels.quant_matmul` against
:func:`rocmforge.gguf.dequant.dequantize` (``tests/kernels/test_quant_matmul.py``).
"""

from __future__ import annotations

import triton
import triton.language as tl
from gguf import GGMLQuantizationType

__all__ = ["DECODERS", "MIN_BLOCK_K"]

MIN_BLOCK_K = 32
"""``BLOCK_K`` must be a power of two and a multiple of the widest sub-block (32)."""


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


_T = GGMLQuantizationType

DECODERS = {
    _T.Q8_0: _decode_q8_0,
    _T.Q4_0: _decode_q4_0,
    _T.Q4_1: _decode_q4_1,
    _T.Q5_0: _decode_q5_0,
    _T.Q5_1: _decode_q5_1,
    _T.Q4_K: _decode_q4_k,
    _T.Q5_K: _decode_q5_k,
    _T.Q6_K: _decode_q6_k,
}
"""The decode helper of each supported type, to pass to a kernel as its ``DECODE``."""
