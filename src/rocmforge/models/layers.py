"""Building blocks shared by the llama family: RMSNorm, rotary embeddings, linear layers.

Pure torch modules: no file I/O, no environment, no logging. Numerics follow HF
transformers (norms and RoPE computed in fp32) so that fp32 logits match it.
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm, optionally fused with the residual add before it: ``norm(x, residual)``
    returns ``(norm(x + residual), x + residual)``, the sum in x's dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps
        self.kernels: ModuleType | None = None
        """:mod:`rocmforge.kernels.fused` when the model runs the fused kernels."""

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.kernels is not None:
            return self.kernels.rms_norm(x, self.weight, self.eps, residual=residual)
        if residual is None:
            return self._norm(x)
        total = x + residual
        return self._norm(total), total

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Rotation factors ``e^(i * pos * inv_freq)`` for the positions of a step, shared by
    every layer.

    ``inv_freq[i] = theta^(-2i/d) / freq_factor[i]``; llama-3 style scaling supplies the
    per-frequency factors (GGUF tensor ``rope_freqs.weight``), linear scaling divides
    positions by ``position_scale``.
    """

    inv_freq: torch.Tensor

    def __init__(
        self,
        head_dim: int,
        theta: float,
        freq_factors: torch.Tensor | None = None,
        position_scale: float = 1.0,
    ) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        if freq_factors is not None:
            inv_freq = inv_freq / freq_factors.float()
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.position_scale = position_scale

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each fp32 ``[T, 1, head_dim / 2]``."""
        pos = positions.float()
        if self.position_scale != 1.0:
            pos = pos / self.position_scale
        freqs = (pos[:, None] * self.inv_freq[None, :]).unsqueeze(1)
        return freqs.cos(), freqs.sin()


def apply_rotary(x: torch.Tensor, rotation: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate the interleaved pairs ``(a, b) = (x[2i], x[2i+1])`` of x ``[T, heads, head_dim]``:
    ``(a cos - b sin, b cos + a sin)`` in fp32 — HF's rotate-half arithmetic, operation for
    operation, on the interleaved layout."""
    cos, sin = rotation
    a, b = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2).to(x.dtype)


class Embedding(nn.Module):
    """Token embedding; the weight is filled by the loader (no random init at construction)."""

    def __init__(self, num_embeddings: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, dim), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class Linear(nn.Module):
    """A dense linear layer holding a ``[out, in]`` weight (and optional bias)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)
