"""A token embedding whose table stays in GGUF block layout on the device.

In: the ``token_embd`` tensor's raw GGUF bytes as a uint8 ``[vocab, row_bytes]`` tensor,
its type, the embedding width, the compute dtype and the kernels (``triton``: a GPU, or
Triton's interpreter; ``native``: the CPU's C++ operators, :mod:`rocmforge.native`). Out:
``forward(ids)`` maps token ids ``[...]`` to ``[..., dim]`` in the compute dtype: the
looked-up rows' blocks are gathered and dequantized, so the table costs its file size
instead of ``vocab x dim`` dense values. A tied output head reads the same buffer
(:class:`~rocmforge.quant.gguf_linear.GGUFLinear` over :attr:`blocks`). The reference is
``F.embedding`` on the dequantized table (tests/models/test_hf_parity.py).
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType
from torch import nn

from rocmforge import native
from rocmforge.quant.gguf_linear import LinearKernels


class GGUFEmbedding(nn.Module):
    blocks: torch.Tensor

    def __init__(
        self,
        blocks: torch.Tensor,
        ggml_type: GGMLQuantizationType,
        dim: int,
        dtype: torch.dtype,
        *,
        kernels: LinearKernels = "triton",
    ) -> None:
        super().__init__()
        self.ggml_type = GGMLQuantizationType(ggml_type)
        self.dim = dim
        self.dtype = dtype
        self.kernels = kernels
        self.register_buffer("blocks", blocks.contiguous(), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.blocks.index_select(0, ids.reshape(-1))
        if self.kernels == "native":
            ops = native.ops()
            if ops is None:
                raise RuntimeError(f"native CPU kernels unavailable: {native.unavailable_reason()}")
            dense = ops.dequantize(rows, int(self.ggml_type), self.dim).to(self.dtype)
        else:
            from rocmforge.kernels.gguf_dequant import dequantize_weight  # imports Triton

            dense = dequantize_weight(rows, self.ggml_type, self.dim, self.dtype)
        return dense.reshape(*ids.shape, self.dim)

    def extra_repr(self) -> str:
        return (
            f"num_embeddings={self.blocks.shape[0]}, dim={self.dim}, type={self.ggml_type.name}, "
            f"kernels={self.kernels}"
        )
