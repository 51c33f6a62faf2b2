"""Plain-torch paged attention: the reference every fast kernel is tested against, and the
backend used where no kernel applies (CPU).

Gathers each sequence's context from its block table into a padded ``[B, S, kv_heads, d]``
tensor, scatters the flattened queries into ``[B, Q, heads, d]``, and runs one masked
``scaled_dot_product_attention`` over the whole batch (prefill, decode and mixed batches
alike). Work is O(B * Q * S); that is fine for a reference and for CPU batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rocmforge.attention.metadata import AttentionMetadata


class TorchPagedAttention:
    """The reference backend; the others subclass it for ``forward`` (K/V written with
    :func:`write_kv`, then their own ``attend``)."""

    name = "torch"

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
        write_kv(k, v, k_cache, v_cache, metadata.slot_mapping)
        return self.attend(q, k_cache, v_cache, metadata, scale)

    def attend(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """Attention only: the new tokens' K/V are already in the cache."""
        return paged_attention(q, k_cache, v_cache, metadata, scale)


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store the new tokens' K/V at their slots (see attention.metadata for the layout)."""
    num_kv_heads, head_dim = k_cache.shape[-2:]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Causal attention of the flattened queries over their sequences' cached context."""
    step = metadata.backend_cache.get("torch")
    if step is None:
        step = metadata.backend_cache["torch"] = _StepIndices.build(metadata, q.device)
    num_seqs = metadata.num_seqs
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    max_q, max_s = metadata.max_query_len, metadata.max_seq_len

    keys = k_cache[step.tables].reshape(num_seqs, -1, num_kv_heads, head_dim)[:, :max_s]
    values = v_cache[step.tables].reshape(num_seqs, -1, num_kv_heads, head_dim)[:, :max_s]
    if step.decode_only:  # one query per sequence: no padding to undo
        queries = q.reshape(num_seqs, 1, num_heads, head_dim)
    else:
        queries = q.new_zeros(num_seqs, max_q, num_heads, head_dim)
        queries[metadata.token_seq, metadata.token_query_pos] = q

    out = F.scaled_dot_product_attention(
        queries.transpose(1, 2),
        keys.transpose(1, 2).to(q.dtype),
        values.transpose(1, 2).to(q.dtype),
        attn_mask=step.mask,
        scale=scale,
        enable_gqa=num_heads != num_kv_heads,
    )
    if step.decode_only:
        return out.transpose(1, 2).reshape(num_tokens, num_heads, head_dim)
    return out.transpose(1, 2)[metadata.token_seq, metadata.token_query_pos]


@dataclass(slots=True)
class _StepIndices:
    """What every layer of one step shares: the block tables cut to the longest context,
    and the mask ``[B, 1, Q, S]``."""

    tables: torch.Tensor
    mask: torch.Tensor
    decode_only: bool

    @classmethod
    def build(cls, metadata: AttentionMetadata, device: torch.device) -> _StepIndices:
        num_seqs = metadata.num_seqs
        max_q, max_s = metadata.max_query_len, metadata.max_seq_len
        num_blocks = -(-max_s // metadata.block_size)
        # Query i of sequence b sits at position s_b - q_b + i and sees keys 0 ..= that position.
        query_lens = metadata.query_start_loc[1:] - metadata.query_start_loc[:-1]
        first_pos = (metadata.seq_lens - query_lens).view(num_seqs, 1, 1)
        query_pos = first_pos + torch.arange(max_q, device=device).view(1, max_q, 1)
        key_pos = torch.arange(max_s, device=device).view(1, 1, max_s)
        mask = (key_pos <= query_pos) & (key_pos < metadata.seq_lens.view(num_seqs, 1, 1))
        return cls(
            tables=metadata.block_tables[:, :num_blocks],
            mask=mask.unsqueeze(1),
            decode_only=max_q == 1 and int(metadata.slot_mapping.shape[0]) == num_seqs,
        )
