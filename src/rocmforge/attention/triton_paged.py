"""The Triton attention backend: paged KV write, then the decode or the prefill kernel.

The new K/V go into the cache with the reference :func:`~rocmforge.attention.torch_ref.write_kv`
(one ``index_copy_`` per cache). A step whose every sequence has exactly one new token runs
the split-K decode kernel, its grid sized by ``metadata.max_seq_len`` (a CUDA-graph capture
passes metadata whose ``max_seq_len`` is the model's, so the replayed grid covers any step);
any other step (prefill, chunked prefill, mixed batches) runs the prefill kernel. Neither
synchronises with the device. The kernels run on a GPU, or on the CPU only under Triton's
interpreter (tests).
"""

from __future__ import annotations

import torch

from rocmforge.attention.metadata import AttentionMetadata
from rocmforge.attention.torch_ref import TorchPagedAttention
from rocmforge.kernels import kernels_usable
from rocmforge.kernels.paged_attention import (
    paged_decode_attention,
    paged_prefill_attention,
)


class TritonPagedAttention(TorchPagedAttention):
    name = "triton"

    def attend(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """Attention only: the new tokens' K/V are already in the cache."""
        if not kernels_usable(q.device):
            raise ValueError(
                f"the triton attention backend cannot run on {q.device}: it needs a GPU with "
                "Triton (or TRITON_INTERPRET=1 on the CPU, for tests)"
            )
        if metadata.max_query_len == 1 and q.shape[0] == metadata.num_seqs:
            return paged_decode_attention(
                q, k_cache, v_cache, metadata.block_tables, metadata.seq_lens, scale,
                max_seq_len=metadata.max_seq_len,
            )
        return paged_prefill_attention(
            q, k_cache, v_cache, metadata.block_tables, metadata.seq_lens,
            metadata.query_start_loc, scale, max_query_len=metadata.max_query_len,
        )
