"""CPU linear layers on quantized weights, through PyTorch's weight-only matmul kernels.

``Int4Linear``: GGUF Q4_0 / Q4_1 / Q4_K weights split into codes and per-32 scale/zero
(:func:`rocmforge.gguf.dequant.split_q4`), kept at 4 bits (plus a bf16 scale and zero per 32
weights) — about a quarter of the bytes of bf16. ``Int8Linear``: every other weight
(Q8_0, Q5/Q6 K-quants, floats) re-quantized to int8 with one scale per output row.
Activations enter the kernels in bf16 and results are cast back to the input dtype. The
dense reference is ``F.linear`` on the dequantized weight; ``tests/quant/test_int4_cpu.py``
compares them.
"""

from __future__ import annotations

import torch
from torch import nn

from rocmforge.gguf.dequant import Q4_GROUP

_KERNEL = getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None)
_PACK = getattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu", None)
_INT8_KERNEL = getattr(torch.ops.aten, "_weight_int8pack_mm", None)


def available() -> bool:
    """Whether this torch build has the CPU int4 kernels (torch >= 2.5)."""
    return _KERNEL is not None and _PACK is not None and _INT8_KERNEL is not None


class Int4Linear(nn.Module):
    def __init__(
        self,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> None:
        """``codes``: uint8 ``[out, in]`` in 0..15; ``scale``/``zero``: ``[out, in // 32]``
        with ``w = (code - 8) * scale + zero``."""
        super().__init__()
        if _PACK is None or _KERNEL is None:
            raise RuntimeError("this torch build has no CPU int4 matmul kernel")
        self._kernel = _KERNEL
        self.out_features, self.in_features = codes.shape
        self.register_buffer("packed", _PACK(codes.to(torch.int32).contiguous(), 1), persistent=False)
        # The kernel wants [in // group, out, 2] (scale, zero) in the activation dtype.
        scales_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()
        self.register_buffer("scales_zeros", scales_zeros.to(torch.bfloat16), persistent=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = self._kernel(rows, self.packed, Q4_GROUP, self.scales_zeros)
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y


class Int8Linear(nn.Module):
    """A linear layer on int8 weights with one bf16 scale per output row (weight-only
    quantization), fed bf16 activations. Used for weights that are not 4-bit (Q8_0, K-quants
    above 4 bits, float): half the bytes of bf16 and, on CPU, a faster kernel."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if _INT8_KERNEL is None:
            raise RuntimeError("this torch build has no CPU int8 weight-only matmul kernel")
        self._kernel = _INT8_KERNEL
        self.out_features, self.in_features = weight.shape
        scale = weight.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
        codes = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.register_buffer("codes", codes, persistent=False)
        self.register_buffer("scale", scale.to(torch.bfloat16), persistent=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = self._kernel(rows, self.codes, self.scale).to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y
