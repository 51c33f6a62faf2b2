"""Per-step attention metadata, built by the model runner, read by attention backends.

The batch is *flattened*: the new tokens of every scheduled sequence are laid back to back,
T tokens in all. For B sequences with query lengths q_b and context lengths (after this
step) s_b::

    tokens        |  seq 0: q_0 tokens  |  seq 1: q_1 tokens  | ... |     (T = sum q_b)
    query_start   0                     q_0                   q_0+q_1 ...  (B+1 entries)

    token t of seq b sits at position  p = s_b - q_b + i   (i = t - query_start[b])
    its K/V go to slot   block_tables[b][p // block_size] * block_size + p % block_size

Query token i of seq b attends to the keys at positions 0 .. s_b - q_b + i (causal).
The KV cache of a layer is ``[num_blocks, block_size, num_kv_heads, head_dim]`` for K and V
each; a slot is a row of its ``[num_blocks * block_size, num_kv_heads, head_dim]`` view.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor
    """[T] int64: cache slot each new token's K/V is written to."""
    block_tables: torch.Tensor
    """[B, max_blocks] int64: block ids of each sequence, padded with 0 (never read past s_b)."""
    seq_lens: torch.Tensor
    """[B] int64: context length of each sequence after this step."""
    query_start_loc: torch.Tensor
    """[B+1] int64: where each sequence's tokens start in the flattened batch."""
    token_seq: torch.Tensor
    """[T] int64: which sequence each token belongs to."""
    token_query_pos: torch.Tensor
    """[T] int64: index of each token within its sequence's query (i above)."""
    max_query_len: int
    max_seq_len: int
    block_size: int
    backend_cache: dict[str, Any] = field(default_factory=dict)
    """Per-step values a backend derives once and reuses in every layer (masks, indices)."""

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.shape[0])

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        seq_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device,
    ) -> AttentionMetadata:
        """Build the tensors from host lists (one entry per sequence)."""
        token_seq: list[int] = []
        token_query_pos: list[int] = []
        slots: list[int] = []
        starts = [0]
        for b, (q_len, s_len, table) in enumerate(zip(query_lens, seq_lens, block_tables)):
            first = s_len - q_len
            for i in range(q_len):
                pos = first + i
                slots.append(table[pos // block_size] * block_size + pos % block_size)
            token_seq.extend([b] * q_len)
            token_query_pos.extend(range(q_len))
            starts.append(starts[-1] + q_len)
        width = max(len(t) for t in block_tables)
        padded = [t + [0] * (width - len(t)) for t in block_tables]

        def tensor(values: list[int] | list[list[int]]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64).to(device, non_blocking=True)

        return cls(
            slot_mapping=tensor(slots),
            block_tables=tensor(padded),
            seq_lens=tensor(seq_lens),
            query_start_loc=tensor(starts),
            token_seq=tensor(token_seq),
            token_query_pos=tensor(token_query_pos),
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            block_size=block_size,
        )
