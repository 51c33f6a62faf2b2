"""Matmul on GGUF-quantized weights that stay in their file layout: ``x @ dequantize(w).T``.

In: activations ``x`` ``[M, K]`` (float32, float16 or bfloat16, any strides) and one weight
tensor's raw GGUF bytes ``w``, a uint8 ``[N, row_bytes]`` tensor (N output rows of K
elements each, in GGUF block layout, exactly the bytes of the file: loading is a memcpy).
Out: ``[M, N]`` in ``x.dtype``, either new or written into a caller's ``out`` (which may be
a column slice of a wider output). The caller owns all three tensors; nothing here keeps
state besides Triton's compiled-kernel cache and each GPU's multiprocessor count.

Every weight byte is read from DRAM once per M tile (once per matmul for decode-sized M;
the M tiles of a prefill share one weight strip through L2) and decoded in registers by
the type's helper in :mod:`rocmforge.kernels.gguf_decode`; the decoded fp32 tile meets
the activations without ever reaching memory. Supported: :data:`SUPPORTED_TYPES` (Q8_0,
Q4_0, Q4_1, Q5_0, Q5_1 with K a multiple of 32; Q4_K, Q5_K, Q6_K with K a multiple of 256).

Both kernels take the decode helper as the constexpr ``DECODE`` (a tile
``W[n, k0 : k0 + BLOCK_K]`` per call), so each (kernel, type) pair compiles on its own:

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
(small N, few rows; see ``_auto_split_k``), K is cut into ``split_k`` ranges of whole K
tiles; each writes fp32 partial sums into a ``[split_k, M, N]`` workspace that one torch
reduction sums into ``out`` (deterministic, unlike fp32 atomics). Nothing here
synchronises with the host. Rows past ``M`` or ``N`` load as zeros and are never stored.

The reference is :func:`reference_quant_matmul` (:func:`rocmforge.gguf.dequant.dequantize`,
then a float32 matmul); ``tests/kernels/test_quant_matmul.py`` compares the two.
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
from rocmforge.kernels.gguf_decode import DECODERS, MIN_BLOCK_K

__all__ = [
    "GEMV_MAX_M",
    "SUPPORTED_TYPES",
    "GemvConfig",
    "TiledConfig",
    "quant_matmul",
    "reference_quant_matmul",
]

SUPPORTED_TYPES: frozenset[GGMLQuantizationType] = frozenset(DECODERS)

_ACTIVATION_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --- kernels (they differ in grid order and tile product; the rest is shared helpers) -------


@triton.jit
def _strip(base_ptr, pid, size, stride, BLOCK: tl.constexpr):
    """Rows ``pid * BLOCK ..`` of a matrix: indices ``[BLOCK]``, which are ``< size``, and
    a pointer to each row's first element (int64: ``row * stride`` can pass 2**31)."""
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < size, base_ptr + offs.to(tl.int64) * stride


@triton.jit
def _k_tiles(pid_s, tiles_per_split, K, BLOCK_K: tl.constexpr):
    """The K tiles ``first .. last - 1`` that split ``pid_s`` sums over."""
    first = pid_s * tiles_per_split
    return first, tl.minimum(first + tiles_per_split, tl.cdiv(K, BLOCK_K))


@triton.jit
def _load_x(x_rows, m_mask, k0, K, stride_xk, BLOCK_K: tl.constexpr):
    """``x[m, k0 : k0 + BLOCK_K]`` of the strip's rows in x's dtype, zero past M and K."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask = m_mask[:, None] & (offs_k < K)[None, :]
    return tl.load(x_rows[:, None] + offs_k[None, :] * stride_xk, mask=mask, other=0.0)


@triton.jit
def _store(out_ptr, acc, offs_m, m_mask, offs_n, n_mask, stride_om, stride_on):
    """``out[m, n] = acc`` rounded to out's dtype, for the rows and columns in range."""
    ptr = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(ptr, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


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
    offs_n, n_mask, row_ptr = _strip(w_ptr, pid_n, N, stride_wn, BLOCK_N)
    offs_m, m_mask, x_rows = _strip(x_ptr, pid_m, M, stride_xm, BLOCK_M)
    first, last = _k_tiles(pid_s, tiles_per_split, K, BLOCK_K)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for tile in range(first, last):
        k0 = tile * BLOCK_K
        w = DECODE(row_ptr, k0, n_mask, K, BLOCK_N, BLOCK_K)
        x = _load_x(x_rows, m_mask, k0, K, stride_xk, BLOCK_K).to(tl.float32)
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)

    _store(out_ptr + pid_s * stride_os, acc, offs_m, m_mask, offs_n, n_mask, stride_om, stride_on)


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
    offs_m, m_mask, x_rows = _strip(x_ptr, pid_m, M, stride_xm, BLOCK_M)
    offs_n, n_mask, row_ptr = _strip(w_ptr, pid_n, N, stride_wn, BLOCK_N)
    first, last = _k_tiles(pid_s, tiles_per_split, K, BLOCK_K)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for tile in range(first, last):
        k0 = tile * BLOCK_K
        x = _load_x(x_rows, m_mask, k0, K, stride_xk, BLOCK_K)
        w = DECODE(row_ptr, k0, n_mask, K, BLOCK_N, BLOCK_K).to(x.dtype)
        if DOT_IN_FP32:
            # Triton's interpreter multiplies bf16 operands as raw uint16 words; the fp32
            # products of the bf16-rounded operands are exact, so this is the same dot.
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)

    _store(out_ptr + pid_s * stride_os, acc, offs_m, m_mask, offs_n, n_mask, stride_om, stride_on)


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
    _check_block("block_k", config.block_k, MIN_BLOCK_K)

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
        DECODERS[qtype],
        config.block_m, config.block_n, config.block_k,
    )  # fmt: skip
    if isinstance(config, GemvConfig):
        _gemv_kernel[(n_tiles, split_k, m_tiles)](*args, num_warps=config.num_warps, enable_fp_fusion=True)
    else:
        _tiled_kernel[(m_tiles, n_tiles, split_k)](
            *args,
            "ieee" if x.dtype == torch.float32 else None,  # None: the backend's default
            x.dtype == torch.bfloat16 and interpreter_active(),
            num_warps=config.num_warps, enable_fp_fusion=True,  # explicit: Triton 3.10 turns the default off
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
