"""Dequantize a GGUF-quantized weight to a dense matrix on the GPU, in one Triton kernel.

In: one weight's raw GGUF bytes, a uint8 ``[N, row_bytes]`` tensor (N rows of K elements in
GGUF block layout), its type and K. Out: a new dense ``[N, K]`` tensor of the requested
float dtype on the same device; the caller owns it (typically for one matmul).

Why: for prefill-sized batches a dense GEMM (cuBLAS / hipBLASLt) on the dequantized weight
beats decoding inside a tiled kernel — the decode costs one pass over the weight, the GEMM
does ``2 M N K`` flops on tensor cores — so :class:`~rocmforge.quant.gguf_linear.GGUFLinear`
takes this path above a batch size and the decode-in-the-matmul kernels below it, as
llama.cpp does. One program per ``BLOCK_N x BLOCK_K`` tile, decoded by the same helpers
as the matmul kernels (:mod:`rocmforge.kernels.gguf_decode`), which follow
:func:`rocmforge.gguf.dequant.dequantize` step for step: in float32 the result is the
reference's, bit for bit (``tests/kernels/test_gguf_dequant.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from rocmforge.kernels import kernels_usable
from rocmforge.kernels.gguf_decode import DECODERS

__all__ = ["dequantize_weight"]

_BLOCK_N = 16
_BLOCK_K = 256
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _dequantize_kernel(
    w_ptr, out_ptr, N, K, stride_wn, stride_on,
    DECODE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    n_mask = rows < N
    row_ptr = w_ptr + rows.to(tl.int64) * stride_wn
    tile = DECODE(row_ptr, k0, n_mask, K, BLOCK_N, BLOCK_K)
    cols = k0 + tl.arange(0, BLOCK_K)
    out = out_ptr + rows.to(tl.int64)[:, None] * stride_on + cols[None, :]
    tl.store(out, tile.to(out_ptr.dtype.element_ty), mask=n_mask[:, None] & (cols < K)[None, :])


def dequantize_weight(
    weight: torch.Tensor, ggml_type: GGMLQuantizationType | int, in_features: int, dtype: torch.dtype
) -> torch.Tensor:
    """The dense ``[N, in_features]`` matrix of ``dtype`` that ``weight`` (uint8
    ``[N, row_bytes]``, unit stride along a row) encodes. ValueError for an unsupported
    type, dtype or shape; RuntimeError where the kernels cannot run."""
    qtype = GGMLQuantizationType(ggml_type)
    if qtype not in DECODERS:
        raise ValueError(f"dequantize_weight does not support {qtype.name}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    block_elements, block_bytes = GGML_QUANT_SIZES[qtype]
    if in_features <= 0 or in_features % block_elements:
        raise ValueError(f"{qtype.name} rows hold a positive multiple of {block_elements} elements, got {in_features}")
    row_bytes = in_features // block_elements * block_bytes
    if weight.dtype != torch.uint8 or weight.dim() != 2 or weight.shape[1] != row_bytes or weight.stride(1) != 1:
        raise ValueError(f"weight must be a uint8 [N, {row_bytes}] tensor with contiguous rows, got "
                         f"{weight.dtype} of shape {tuple(weight.shape)}")
    if not kernels_usable(weight.device):
        raise RuntimeError(f"the Triton kernels cannot run on {weight.device} here")
    n = weight.shape[0]
    out = torch.empty((n, in_features), dtype=dtype, device=weight.device)
    if n:
        grid = (triton.cdiv(n, _BLOCK_N), triton.cdiv(in_features, _BLOCK_K))
        _dequantize_kernel[grid](
            weight, out, n, in_features, weight.stride(0), out.stride(0),
            DECODERS[qtype], _BLOCK_N, _BLOCK_K, num_warps=4, enable_fp_fusion=True,
        )
    return out
