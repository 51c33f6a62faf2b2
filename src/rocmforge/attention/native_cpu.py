"""Paged attention on the CPU through the native operator (``decode_attention`` in
``rocmforge/native/csrc/layer_ops.cpp``) for decode steps — one query per sequence — and the
torch reference for every other step (prefill chunks, mixed batches), where the attention
matmuls are large enough for torch's kernels."""

from __future__ import annotations

import torch

from rocmforge.attention.metadata import AttentionMetadata
from rocmforge.attention.torch_ref import TorchPagedAttention
from rocmforge.native import ops


class NativeCPUAttention(TorchPagedAttention):
    name = "native"

    def attend(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """Attention only: the new tokens' K/V are already in the cache."""
        native = ops()
        decode = metadata.max_query_len == 1 and q.shape[0] == metadata.num_seqs
        if native is None or not decode or q.dtype != torch.float32 or k_cache.dtype != torch.float32:
            return super().attend(q, k_cache, v_cache, metadata, scale)
        return native.decode_attention(q, k_cache, v_cache, metadata.block_tables, metadata.seq_lens, scale)
