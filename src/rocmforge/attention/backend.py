"""The attention backend interface and the choice between implementations.

A backend does two things per layer and step: write the new tokens' K/V into the paged
cache, and compute attention of the new queries over each sequence's cached context.
"""

from __future__ import annotations

from typing import Protocol

import torch

from rocmforge.attention.metadata import AttentionMetadata


class AttentionBackend(Protocol):
    name: str

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """q: [T, num_heads, head_dim]; k, v: [T, num_kv_heads, head_dim] (new tokens);
        caches: [num_blocks, block_size, num_kv_heads, head_dim]. Returns [T, num_heads, head_dim]."""
        ...


def get_backend(name: str = "torch") -> AttentionBackend:
    from rocmforge.attention.torch_ref import TorchPagedAttention

    backends: dict[str, type] = {"torch": TorchPagedAttention}
    if name not in backends:
        raise ValueError(f"unknown attention backend {name!r} (have: {', '.join(backends)})")
    return backends[name]()
