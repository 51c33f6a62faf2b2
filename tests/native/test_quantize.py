"""Activation quantization (BlockQ8 / BlockQ8K) of every instruction set against the numpy
model: the same bits, not just close values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tests.native.integer_model import quantize_row, unpack_q8

native = pytest.importorskip("rocmforge.native")
ops = native.ops()
pytestmark = pytest.mark.skipif(ops is None, reason=f"native kernels unavailable: {native.unavailable_reason()}")
ISAS = list(ops.available_isas()) if ops is not None else []

Q8_0, Q4_K = 8, 12


@pytest.mark.parametrize("isa", ISAS, ids=lambda i: native.ISA_NAMES[i])
@pytest.mark.parametrize(("ggml_type", "block"), [(Q8_0, 32), (Q4_K, 256)], ids=["q8", "q8k"])
def test_quantize_matches_the_model_bit_for_bit(isa: int, ggml_type: int, block: int) -> None:
    gen = torch.Generator().manual_seed(1000 + isa + block)
    x = torch.randn(5, 4 * block, generator=gen) * torch.logspace(-3, 2, 5)[:, None]
    x[1, :block] = 0.0  # an all-zero block: d = 0, codes 0
    x[2, 3] = x[2, :block].abs().max() * 7  # one outlier dominating its block
    raw = ops.quantize(x, ggml_type, isa).numpy()
    for row in range(x.shape[0]):
        got = unpack_q8(raw[row], block)
        want = quantize_row(x[row].numpy(), block)
        np.testing.assert_array_equal(got.d, want.d)
        np.testing.assert_array_equal(got.qs, want.qs)
        if block == 32:
            np.testing.assert_array_equal(got.s, want.s)
        else:
            np.testing.assert_array_equal(got.bsums, want.bsums)
            np.testing.assert_array_equal(got.dsums, want.dsums)
        assert np.abs(got.qs).max() <= 127

