"""Dequantize GGML tensor data to floating point, in plain torch ops.

In: the raw bytes of one tensor exactly as they lie in a GGUF file (a 1-D ``uint8`` tensor
on any device), its :class:`gguf.GGMLQuantizationType` and its torch-order shape. Out: a
new tensor of that shape and the requested float dtype, on the same device. Nothing here
reads files or keeps state; the caller owns both tensors.

Every decoder works on a ``(n_blocks, type_size)`` byte view and is vectorised over blocks,
so the same code runs on CPU, CUDA and ROCm. Blocks are decoded in chunks of about
``_CHUNK_ELEMENTS`` values straight into the output, which bounds the temporaries.

The numpy dequantizers in ``gguf.quants`` are the reference: every decoder mirrors their
float32 arithmetic step for step (fp16 scale -> fp32, then ``d * scale``, then ``* q``,
then ``+ m`` or ``- min``), so the float32 result is bit-identical (see
``tests/gguf/test_dequant.py``). The products are exact in float32 (an 11-bit fp16
mantissa times integer scales and codes whose product stays below 2**13), so only the
final add or subtract rounds; an FMA or a fused kernel would give the same bits. The one
difference: a signalling NaN in F16 data comes out quiet (torch sets the quiet bit, numpy
does not).

Block layouts (bytes per field, in file order; ``f16`` is a little-endian IEEE half,
``q`` the unsigned code of one element, ``x`` the value it stands for)::

    F32   4 B/elem                        F16 / BF16   2 B/elem
    Q8_0  32 elems, 34 B: | d f16 2 | qs int8 32 |                 x = d * q
    Q4_0  32 elems, 18 B: | d f16 2 | qs 16 |                      x = d * (q - 8)
    Q4_1  32 elems, 20 B: | d f16 2 | m f16 2 | qs 16 |            x = d * q + m
    Q5_0  32 elems, 22 B: | d f16 2 | qh 4 | qs 16 |               x = d * (q - 16)
    Q5_1  32 elems, 24 B: | d f16 2 | m f16 2 | qh 4 | qs 16 |     x = d * q + m
        qs byte j holds element j (low nibble) and element j + 16 (high nibble);
        qh is a little-endian uint32 whose bit i is bit 4 of element i.

    K-quants: 256 elements per super-block, split into sub-blocks with 4..8-bit scales.
    Q2_K  84 B: | scales 16 | qs 64 | d f16 2 | dmin f16 2 |
        16 sub-blocks of 16; scales byte i = (min << 4) | scale of sub-block i.
        Element 128c + 32s + j = bits 2s..2s+1 of qs byte 32c + j.
        x = (d * scale) * q - (dmin * min)
    Q3_K  110 B: | hmask 32 | qs 64 | scales 12 | d f16 2 |
        16 sub-blocks of 16 with 6-bit scales s (stored as s + 32); with i = byte % 8
            byte 0..7:  | s[8+i] bits 0-3 | s[i] bits 0-3 |
            byte 8..11: | s[12+i] bits 4-5 | s[8+i] bits 4-5 | s[4+i] bits 4-5 | s[i] bits 4-5 |
        2 low bits as in Q2_K; element 32s + j has bit 2 = bit s of hmask byte j,
        and a set bit means "no offset": x = (d * (scale - 32)) * (q_low - 4 * (1 - hbit))
    Q4_K  144 B: | d f16 2 | dmin f16 2 | scales 12 | qs 128 |
    Q5_K  176 B: | d f16 2 | dmin f16 2 | scales 12 | qh 32 | qs 128 |
        8 sub-blocks of 32, each with a 6-bit scale s and a 6-bit min m; with i = byte % 4
            byte 0..3:  | s[4+i] bits 4-5 (2 bits) | s[i] (6 bits)             |
            byte 4..7:  | m[4+i] bits 4-5 (2 bits) | m[i] (6 bits)             |
            byte 8..11: | m[4+i] bits 0-3 (4 bits) | s[4+i] bits 0-3 (4 bits)  |
        Element 64c + 32s + j = nibble s of qs byte 32c + j; in Q5_K bit 4 of element
        32s + j = bit s of qh byte j.     x = (d * scale) * q - (dmin * min)
    Q6_K  210 B: | ql 128 | qh 64 | scales int8 16 | d f16 2 |
        16 sub-blocks of 16. Element 128c + 64s + j: low 4 bits = nibble s of ql byte
        64c + j; element 128c + 32t + j: high 2 bits = bits 2t..2t+1 of qh byte 32c + j.
        x = (d * scale) * (q - 32)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from rocmforge.errors import GGUFFormatError, GGUFUnsupportedError

__all__ = ["SUPPORTED_TYPES", "dequantize", "row_bytes"]

_T = GGMLQuantizationType

# Values decoded per chunk of blocks: bounds each float32 temporary to 4 MiB, which on
# CPU also keeps the chunk in cache (1 << 20 measured 1.5-3x faster than 1 << 22).
_CHUNK_ELEMENTS = 1 << 20

_Decoder = Callable[[torch.Tensor], torch.Tensor]
"""Maps a ``(n, type_size)`` uint8 block view to ``(n, block_size)`` floats, exactly."""


# --- field helpers ------------------------------------------------------------------------


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 field at byte ``start`` of every block, as a ``(n, 1)`` float32 column."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).to(torch.float32)


def _fields(packed: torch.Tensor, shifts: Sequence[int], mask: int, dim: int) -> torch.Tensor:
    """Split every byte of ``packed`` into bit fields ``(byte >> shift) & mask``.

    The fields get a new axis at ``dim``: ``-2`` puts all bytes' first field before all
    their second fields (nibble and 2-bit planes), ``-1`` keeps each byte's fields
    together (the bits of a little-endian bitmask).
    """
    return torch.stack([(packed >> shift) & mask for shift in shifts], dim=dim)


def _k_scales_mins(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack the 12-byte Q4_K/Q5_K scale field into 8 scales and 8 mins (uint8, 0..63)."""
    n = scales.shape[0]
    packed = scales.reshape(n, 3, 4)
    lo_sc, lo_m, hi = packed[:, 0], packed[:, 1], packed[:, 2]
    sc = torch.cat([lo_sc & 0x3F, (hi & 0x0F) | ((lo_sc >> 2) & 0x30)], dim=-1)
    mn = torch.cat([lo_m & 0x3F, (hi >> 4) | ((lo_m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _view_as(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reinterpret whole blocks as ``dtype`` (copying first when the bytes are misaligned)."""
    if not blocks.is_contiguous() or blocks.storage_offset() % dtype.itemsize:
        blocks = blocks.clone()
    return blocks.view(dtype)


# --- decoders, one per type ---------------------------------------------------------------


def _dequant_f32(blocks: torch.Tensor) -> torch.Tensor:
    return _view_as(blocks, torch.float32)


def _dequant_f16(blocks: torch.Tensor) -> torch.Tensor:
    return _view_as(blocks, torch.float16)


def _dequant_bf16(blocks: torch.Tensor) -> torch.Tensor:
    return _view_as(blocks, torch.bfloat16)


def _dequant_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks, 0)
    q = blocks[:, 2:].view(torch.int8).to(torch.float32)
    return q * d


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """16 bytes -> 32 codes: low nibbles first, then high nibbles (Q4_0 ... Q5_1)."""
    return _fields(qs, (0, 4), 0x0F, dim=-2).reshape(qs.shape[0], 32)


def _bit4(qh: torch.Tensor) -> torch.Tensor:
    """4 bytes of little-endian uint32 -> bit i as the 5th bit (value 16) of code i."""
    return _fields(qh, range(8), 0x01, dim=-1).reshape(qh.shape[0], 32) << 4


def _dequant_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks, 0)
    q = _nibbles(blocks[:, 2:18]).to(torch.int8) - 8
    return d * q.to(torch.float32)


def _dequant_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    q = _nibbles(blocks[:, 4:20]).to(torch.float32)
    return (d * q) + m


def _dequant_q5_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks, 0)
    q = (_nibbles(blocks[:, 6:22]) | _bit4(blocks[:, 2:6])).to(torch.int8) - 16
    return d * q.to(torch.float32)


def _dequant_q5_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    q = (_nibbles(blocks[:, 8:24]) | _bit4(blocks[:, 4:8])).to(torch.float32)
    return (d * q) + m


def _dequant_q2_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    scales = blocks[:, 0:16]
    d, dmin = _f16(blocks, 80), _f16(blocks, 82)
    dl = (d * (scales & 0x0F).to(torch.float32)).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).to(torch.float32)).reshape(n, 16, 1)
    q = _fields(blocks[:, 16:80].reshape(n, 2, 32), (0, 2, 4, 6), 0x03, dim=-2)
    q = q.reshape(n, 16, 16).to(torch.float32)
    return (dl * q - ml).reshape(n, 256)


def _dequant_q3_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d = _f16(blocks, 108)
    low = _fields(blocks[:, 96:104], (0, 4), 0x0F, dim=-2).reshape(n, 16)
    high = _fields(blocks[:, 104:108], (0, 2, 4, 6), 0x03, dim=-2).reshape(n, 16)
    scales = ((low | (high << 4)).to(torch.int8) - 32).to(torch.float32)
    dl = (d * scales).reshape(n, 16, 1)
    ql = _fields(blocks[:, 32:96].reshape(n, 2, 32), (0, 2, 4, 6), 0x03, dim=-2)
    hbit = _fields(blocks[:, 0:32], range(8), 0x01, dim=-2)
    offset = ((hbit ^ 1) << 2).reshape(n, 16, 16).to(torch.int8)
    q = (ql.reshape(n, 16, 16).to(torch.int8) - offset).to(torch.float32)
    return (dl * q).reshape(n, 256)


def _k_scale_columns(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``d * scale`` and ``dmin * min`` per 32-element sub-block of Q4_K/Q5_K, ``(n, 8, 1)``."""
    n = blocks.shape[0]
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    sc, mn = _k_scales_mins(blocks[:, 4:16])
    scale = (d * sc.to(torch.float32)).reshape(n, 8, 1)
    offset = (dmin * mn.to(torch.float32)).reshape(n, 8, 1)
    return scale, offset


def _dequant_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    scale, offset = _k_scale_columns(blocks)
    q = _fields(blocks[:, 16:144].reshape(n, 4, 32), (0, 4), 0x0F, dim=-2)
    q = q.reshape(n, 8, 32).to(torch.float32)
    return (scale * q - offset).reshape(n, 256)


def _dequant_q5_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    scale, offset = _k_scale_columns(blocks)
    ql = _fields(blocks[:, 48:176].reshape(n, 4, 32), (0, 4), 0x0F, dim=-2).reshape(n, 8, 32)
    qh = _fields(blocks[:, 16:48], range(8), 0x01, dim=-2)
    q = (ql | (qh << 4)).to(torch.float32)
    return (scale * q - offset).reshape(n, 256)


def _dequant_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    scales = blocks[:, 192:208].view(torch.int8).to(torch.float32)
    d = _f16(blocks, 208)
    dl = (d * scales).reshape(n, 16, 1)
    ql = _fields(blocks[:, 0:128].reshape(n, 2, 64), (0, 4), 0x0F, dim=-2).reshape(n, 8, 32)
    qh = _fields(blocks[:, 128:192].reshape(n, 2, 32), (0, 2, 4, 6), 0x03, dim=-2)
    q = (ql | (qh.reshape(n, 8, 32) << 4)).to(torch.int8) - 32
    return (dl * q.reshape(n, 16, 16).to(torch.float32)).reshape(n, 256)


_DECODERS: dict[GGMLQuantizationType, _Decoder] = {
    _T.F32: _dequant_f32,
    _T.F16: _dequant_f16,
    _T.BF16: _dequant_bf16,
    _T.Q8_0: _dequant_q8_0,
    _T.Q4_0: _dequant_q4_0,
    _T.Q4_1: _dequant_q4_1,
    _T.Q5_0: _dequant_q5_0,
    _T.Q5_1: _dequant_q5_1,
    _T.Q2_K: _dequant_q2_k,
    _T.Q3_K: _dequant_q3_k,
    _T.Q4_K: _dequant_q4_k,
    _T.Q5_K: _dequant_q5_k,
    _T.Q6_K: _dequant_q6_k,
}

SUPPORTED_TYPES: frozenset[GGMLQuantizationType] = frozenset(_DECODERS)


# --- public API ---------------------------------------------------------------------------


def _quant_sizes(ggml_type: GGMLQuantizationType | int) -> tuple[GGMLQuantizationType, int, int]:
    """The type as an enum member, its block size (elements) and type size (bytes)."""
    try:
        qtype = GGMLQuantizationType(ggml_type)
        block_size, type_size = GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError) as exc:
        raise GGUFUnsupportedError(f"unknown GGML tensor type {ggml_type!r}") from exc
    return qtype, block_size, type_size


def row_bytes(ggml_type: GGMLQuantizationType, n_cols: int) -> int:
    """Bytes taken by one row of ``n_cols`` elements of ``ggml_type`` (any known type).

    Raises :class:`GGUFFormatError` when ``n_cols`` is not a whole number of blocks.
    """
    qtype, block_size, type_size = _quant_sizes(ggml_type)
    if n_cols < 0 or n_cols % block_size:
        raise GGUFFormatError(
            f"row of {n_cols} elements is not a whole number of {qtype.name} blocks "
            f"of {block_size}",
            field="tensor shape",
            offset=0,
        )
    return n_cols // block_size * type_size


def dequantize(
    data: torch.Tensor,
    ggml_type: GGMLQuantizationType,
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Decode one tensor's GGUF bytes into a new ``shape``-shaped ``dtype`` tensor.

    ``data`` holds exactly the tensor's bytes in GGUF block layout, on any device: a 1-D
    ``uint8`` tensor (a tensor of another dtype is reinterpreted as its bytes).
    ``shape`` is in torch (row-major) order; ``shape[-1]`` is the GGUF row, a multiple
    of the type's block size. The result lives on ``data.device`` and never shares
    memory with ``data``; in float32 it is bit-identical to ``gguf.quants.dequantize``.

    Raises :class:`GGUFUnsupportedError` for a type without a decoder (or a non-float
    ``dtype``) and :class:`GGUFFormatError` when the byte count does not match ``shape``.
    """
    qtype, block_size, type_size = _quant_sizes(ggml_type)
    decoder = _DECODERS.get(qtype)
    if decoder is None:
        raise GGUFUnsupportedError(f"dequantizing GGML type {qtype.name} is not supported")
    if not dtype.is_floating_point:
        raise GGUFUnsupportedError(f"cannot dequantize to non-float dtype {dtype}")
    dims = tuple(int(dim) for dim in shape)
    if any(dim < 0 for dim in dims):
        raise GGUFFormatError(
            f"negative dimension in shape {dims}", field="tensor shape", offset=0
        )

    n_cols = dims[-1] if dims else 1
    n_elements = math.prod(dims)
    expected = row_bytes(qtype, n_cols) * (n_elements // n_cols) if n_cols else 0
    raw = data.reshape(-1)
    if raw.dtype != torch.uint8:
        raw = raw.contiguous().view(torch.uint8)
    if raw.numel() != expected:
        raise GGUFFormatError(
            f"{qtype.name} tensor of shape {list(dims)} needs {expected} bytes, "
            f"got {raw.numel()}",
            field="tensor data",
            offset=0,
        )

    n_blocks = n_elements // block_size
    blocks = raw.contiguous().view(n_blocks, type_size)
    out = torch.empty((n_blocks, block_size), dtype=dtype, device=raw.device)
    step = max(1, _CHUNK_ELEMENTS // block_size)
    for start in range(0, n_blocks, step):
        out[start : start + step] = decoder(blocks[start : start + step])
    return out.view(dims)


# --- 4-bit codes for quantized matmul kernels ---------------------------------------------

Q4_GROUP = 32
"""Elements sharing one scale/zero pair in :func:`split_q4`."""
Q4_TYPES = frozenset({_T.Q4_0, _T.Q4_1, _T.Q4_K})


def split_q4(
    data: torch.Tensor, ggml_type: GGMLQuantizationType, shape: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decompose a 4-bit 2-D tensor into codes and per-32-element affine parameters.

    Returns ``codes`` (uint8 0..15, ``shape``), ``scale`` and ``zero`` (float32,
    ``(rows, cols // 32)``) such that ``x = (code - 8) * scale + zero`` — the form the
    int4 matmul kernels take. Q4_0: scale d, zero 0. Q4_1: scale d, zero m + 8d.
    Q4_K: per 32-element sub-block scale d*sc, zero 8*d*sc - dmin*m.
    """
    qtype, block_size, type_size = _quant_sizes(ggml_type)
    if qtype not in Q4_TYPES or len(shape) != 2:
        raise GGUFUnsupportedError(f"{qtype.name} tensor of shape {list(shape)} has no 4-bit split")
    rows, cols = (int(d) for d in shape)
    blocks = data.reshape(-1).contiguous().view(rows * cols // block_size, type_size)
    if qtype == _T.Q4_K:
        scale, offset = _k_scale_columns(blocks)  # (n, 8, 1) each
        n = blocks.shape[0]
        codes = _fields(blocks[:, 16:144].reshape(n, 4, 32), (0, 4), 0x0F, dim=-2).reshape(n, 256)
        scale, zero = scale.reshape(n, 8), 8 * scale.reshape(n, 8) - offset.reshape(n, 8)
    else:
        first_code = 2 if qtype == _T.Q4_0 else 4
        codes = _nibbles(blocks[:, first_code : first_code + 16])
        scale = _f16(blocks, 0)
        zero = torch.zeros_like(scale) if qtype == _T.Q4_0 else _f16(blocks, 2) + 8 * scale
    groups = cols // Q4_GROUP
    return codes.reshape(rows, cols), scale.reshape(rows, groups), zero.reshape(rows, groups)
