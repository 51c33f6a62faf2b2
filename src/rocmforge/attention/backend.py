"""The attention backend interface and the choice between implementations.

A backend does two things per layer and step: write the new tokens' K/V into the paged
cache, and compute attention of the new queries over each sequence's cached context.
``forward`` does both; ``attend`` only the second, for models whose fused RoPE + KV-write
kernel (:func:`rocmforge.kernels.fused.apply_rotary_and_write_kv`) already filled the cache.
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

    def attend(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """``forward`` without the KV write: the new tokens' K/V are already in the cache."""
        ...


def get_backend(name: str = "torch") -> AttentionBackend:
    """``"torch"`` (the reference, any device), ``"triton"`` (the paged kernels; imports
    Triton, so only on request) or ``"native"`` (the CPU's C++ decode attention)."""
    if name == "torch":
        from rocmforge.attention.torch_ref import TorchPagedAttention

        return TorchPagedAttention()
    if name == "triton":
        from rocmforge.attention.triton_paged import TritonPagedAttention

        return TritonPagedAttention()
    if name == "native":
        from rocmforge.attention.native_cpu import NativeCPUAttention

        return NativeCPUAttention()
    raise ValueError(f"unknown attention backend {name!r} (have: torch, triton, native)")
