"""The many-row matmul path: a batch of activation rows (weight pieces decoded once for up to
four rows, weight rows in L1-sized blocks) gives, row for row and bit for bit, what each row
alone gives, for every dot type on every instruction set, at ragged row counts and across
the block boundaries of the row loop. The one-row results themselves are checked against
the integer models in test_legacy.py / test_kquants.py."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as T
from tests.gguf_blocks import random_weight

native = pytest.importorskip("rocmforge.native")
ops = native.ops()
pytestmark = pytest.mark.skipif(ops is None, reason=f"native kernels unavailable: {native.unavailable_reason()}")
ISAS = list(ops.available_isas()) if ops is not None else []
ISA_IDS = {"ids": lambda i: native.ISA_NAMES[i]}

DOT_TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K]


def _activations(m: int, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen) * torch.logspace(-2, 1, m)[:, None]
    x[m // 2] = 0.0  # an all-zero row among the others
    return x


def _one_row_at_a_time(x: torch.Tensor, weights: list[torch.Tensor], types: list[int], isa: int) -> torch.Tensor:
    n = sum(w.shape[0] for w in weights)
    out = torch.empty(x.shape[0], n)
    for i in range(x.shape[0]):
        row = torch.empty(1, n)
        ops.matmul(x[i : i + 1], weights, types, row, isa)
        out[i] = row[0]
    return out


@pytest.mark.parametrize("isa", ISAS, **ISA_IDS)
@pytest.mark.parametrize("qtype", DOT_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("m", [2, 4, 5, 11, 37])
def test_a_batch_of_rows_is_each_row_alone_bit_for_bit(isa: int, qtype: T, m: int) -> None:
    k = 1280 if qtype in (T.Q4_K, T.Q5_K, T.Q6_K) else 1312  # 5 super-blocks / 41 blocks
    n = 67  # several L1 blocks of weight rows, the last one partial
    weight = random_weight(qtype, n, k, seed=m)
    x = _activations(m, k, seed=100 + m)
    out = torch.empty(m, n)
    ops.matmul(x, [weight], [int(qtype)], out, isa)
    expected = _one_row_at_a_time(x, [weight], [int(qtype)], isa)
    assert torch.equal(out, expected)
    assert out[m // 2].abs().max() == 0.0


@pytest.mark.parametrize("isa", ISAS, **ISA_IDS)
def test_mixed_parts_in_a_batch_are_each_row_alone(isa: int) -> None:
    """Q4_K | Q6_K | Q8_0 parts of one weight (two activation formats) in one call."""
    k = 512
    parts = [random_weight(T.Q4_K, 19, k, 1), random_weight(T.Q6_K, 7, k, 2), random_weight(T.Q8_0, 30, k, 3)]
    types = [int(T.Q4_K), int(T.Q6_K), int(T.Q8_0)]
    x = _activations(9, k, seed=7)
    out = torch.empty(9, 56)
    ops.matmul(x, parts, types, out, isa)
    assert torch.equal(out, _one_row_at_a_time(x, parts, types, isa))
