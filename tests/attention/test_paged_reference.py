"""The paged torch attention against naive per-sequence causal attention.

Random sequences with odd lengths, block boundaries, GQA ratios, scattered block tables
and mixed prefill/decode batches: the paged path must equal attention computed from the
contiguous K/V of each sequence.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from rocmforge.attention import AttentionMetadata
from rocmforge.attention.torch_ref import TorchPagedAttention


def _naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first_pos: int, scale: float) -> torch.Tensor:
    """q: [Q, H, D] at positions first_pos.., k/v: [S, KVH, D] (the whole context)."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = torch.einsum("qhd,shd->hqs", q, k) * scale
    q_pos = torch.arange(q.shape[0])[:, None] + first_pos
    allowed = torch.arange(k.shape[0])[None, :] <= q_pos
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqs,shd->qhd", scores.softmax(-1), v)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (8, 1)])
def test_paged_attention_matches_naive(seed: int, heads: int, kv_heads: int) -> None:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    head_dim, block_size = 16, rng.choice([1, 4, 16])
    num_seqs = rng.randint(1, 5)
    decode_only = seed % 3 == 0
    context = [rng.randint(1, 40) for _ in range(num_seqs)]
    query = [1 if decode_only else rng.randint(1, c) for c in context]
    blocks_needed = [math.ceil(c / block_size) for c in context]
    pool = list(range(sum(blocks_needed) + 3))
    rng.shuffle(pool)
    tables, offset = [], 0
    for n in blocks_needed:
        tables.append(pool[offset : offset + n])
        offset += n
    num_blocks = len(pool)

    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim)  # garbage outside written slots
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim)
    full_k = [torch.randn(c, kv_heads, head_dim) for c in context]
    full_v = [torch.randn(c, kv_heads, head_dim) for c in context]
    # The context before this step's queries is already cached.
    for b, c in enumerate(context):
        for pos in range(c - query[b]):
            blk, off = tables[b][pos // block_size], pos % block_size
            k_cache[blk, off], v_cache[blk, off] = full_k[b][pos], full_v[b][pos]

    q = torch.cat([torch.randn(n, heads, head_dim) for n in query])
    k_new = torch.cat([full_k[b][c - query[b] :] for b, c in enumerate(context)])
    v_new = torch.cat([full_v[b][c - query[b] :] for b, c in enumerate(context)])
    metadata = AttentionMetadata.build(query, context, tables, block_size, torch.device("cpu"))
    scale = head_dim**-0.5
    out = TorchPagedAttention().forward(q, k_new, v_new, k_cache, v_cache, metadata, scale)

    start = 0
    for b, c in enumerate(context):
        expected = _naive(q[start : start + query[b]], full_k[b], full_v[b], c - query[b], scale)
        torch.testing.assert_close(out[start : start + query[b]], expected, rtol=1e-5, atol=1e-5)
        start += query[b]
