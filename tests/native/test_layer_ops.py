"""The native fused layer ops against the torch code they replace, on fresh random inputs:
RMSNorm (+ residual), RoPE + KV write, SiLU-and-mul, and paged decode attention (ragged
sequence lengths, grouped-query heads, shuffled block tables)."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from rocmforge import native
from rocmforge.attention import AttentionMetadata
from rocmforge.attention.torch_ref import paged_attention, write_kv
from rocmforge.models.layers import RMSNorm, apply_rotary

pytestmark = pytest.mark.skipif(native.ops() is None, reason=f"native kernels unavailable: {native.unavailable_reason()}")


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(random.randrange(2**31))


@pytest.mark.parametrize("rows", [1, 3, 17])
def test_rms_norm_with_and_without_residual(gen: torch.Generator, rows: int) -> None:
    from rocmforge.native import fused

    norm = RMSNorm(96, 1e-5)
    norm.weight.data = torch.rand(96, generator=gen) + 0.5
    x = torch.randn(rows, 96, generator=gen) * 3
    residual = torch.randn(rows, 96, generator=gen)
    torch.testing.assert_close(fused.rms_norm(x, norm.weight, norm.eps), norm(x), rtol=1e-5, atol=1e-5)
    got, got_sum = fused.rms_norm(x, norm.weight, norm.eps, residual=residual)
    want, want_sum = norm(x, residual)
    torch.testing.assert_close(got_sum, want_sum, rtol=0, atol=0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_silu_and_mul(gen: torch.Generator) -> None:
    from rocmforge.native import fused

    gate_up = torch.randn(5, 2 * 80, generator=gen) * 4
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(fused.silu_and_mul(gate_up), F.silu(gate) * up, rtol=1e-5, atol=1e-6)


def test_rope_and_kv_write_match_the_unfused_path(gen: torch.Generator) -> None:
    from rocmforge.native import fused

    tokens, heads, kv_heads, dim, blocks, block = 6, 4, 2, 16, 5, 4
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=gen)
    qk = qkv[:, : (heads + kv_heads) * dim].reshape(tokens, heads + kv_heads, dim)  # strided views, as the model has
    v = qkv[:, (heads + kv_heads) * dim :].reshape(tokens, kv_heads, dim)
    angles = torch.rand(tokens, 1, dim // 2, generator=gen) * 6
    cos, sin = angles.cos(), angles.sin()
    slots = torch.randperm(blocks * block, generator=gen)[:tokens]
    slots[2] = -1  # a padding token: nothing written
    caches = [torch.zeros(blocks, block, kv_heads, dim) for _ in range(4)]
    q = fused.apply_rotary_and_write_kv(qk, v, cos, sin, caches[0], caches[1], slots, heads)

    rotated = apply_rotary(qk, (cos, sin))
    keep = slots >= 0
    write_kv(rotated[keep, heads:], v[keep], caches[2], caches[3], slots[keep])
    torch.testing.assert_close(q, rotated[:, :heads], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(caches[0], caches[2], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(caches[1], caches[3], rtol=0, atol=0)


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (6, 2), (8, 1)])
def test_decode_attention_matches_the_reference(gen: torch.Generator, heads: int, kv_heads: int) -> None:
    dim, block, num_blocks = 32, 4, 40
    lens = [1, 5, 16, 23]
    k_cache = torch.randn(num_blocks, block, kv_heads, dim, generator=gen)
    v_cache = torch.randn(num_blocks, block, kv_heads, dim, generator=gen)
    ids = torch.randperm(num_blocks, generator=gen).tolist()
    tables, start = [], 0
    for n in lens:
        count = -(-n // block)
        tables.append(ids[start : start + count])
        start += count
    metadata = AttentionMetadata.build([1] * len(lens), lens, tables, block, torch.device("cpu"))
    q = torch.randn(len(lens), heads, dim, generator=gen)
    scale = dim**-0.5
    got = native.ops().decode_attention(q, k_cache, v_cache, metadata.block_tables, metadata.seq_lens, scale)
    want = paged_attention(q, k_cache, v_cache, metadata, scale)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_decode_attention_refuses_a_table_that_points_outside_the_cache() -> None:
    cache = torch.zeros(2, 4, 1, 8)
    with pytest.raises(RuntimeError, match="block id out of range"):
        native.ops().decode_attention(torch.zeros(1, 1, 8), cache, cache, torch.tensor([[5]]), torch.tensor([3]), 1.0)
