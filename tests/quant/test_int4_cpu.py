"""The CPU int4 fast path against its dense reference, on fresh random inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q

from rocmforge.gguf.dequant import dequantize, split_q4
from rocmforge.quant import int4_cpu
from rocmforge.synthetic import encode_weight

pytestmark = pytest.mark.skipif(not int4_cpu.available(), reason="torch build lacks CPU int4 kernels")


def _random_q4(qtype: Q, rows: int, cols: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
    raw, _ = encode_weight(weight, qtype, rng)
    return torch.from_numpy(np.ascontiguousarray(raw).view(np.uint8).reshape(-1).copy())


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q4_K])
def test_split_q4_reconstructs_dequantize(qtype: Q) -> None:
    rows, cols = 48, 512
    raw = _random_q4(qtype, rows, cols, seed=int(qtype))
    codes, scale, zero = split_q4(raw, qtype, (rows, cols))
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15
    rebuilt = (codes.float() - 8) * scale.repeat_interleave(32, dim=1) + zero.repeat_interleave(32, dim=1)
    expected = dequantize(raw, qtype, (rows, cols))
    # Same values up to float32 rounding of the re-associated affine form.
    torch.testing.assert_close(rebuilt, expected, rtol=0, atol=1e-6 * float(expected.abs().max()))


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q4_K])
@pytest.mark.parametrize("tokens", [1, 7])
def test_int4_linear_matches_dense(qtype: Q, tokens: int) -> None:
    rows, cols = 96, 256
    raw = _random_q4(qtype, rows, cols, seed=tokens)
    bias = torch.randn(rows)
    layer = int4_cpu.Int4Linear(*split_q4(raw, qtype, (rows, cols)), bias=bias)
    x = torch.randn(tokens, cols)
    expected = F.linear(x, dequantize(raw, qtype, (rows, cols)), bias)
    got = layer(x)
    assert got.dtype == x.dtype and got.shape == expected.shape
    # bf16 activations and scales: relative error of a few parts in a thousand.
    err = (got - expected).abs().max() / expected.abs().max()
    assert err < 2e-2, err


def test_int8_linear_matches_dense() -> None:
    weight, x, bias = torch.randn(64, 128), torch.randn(5, 128), torch.randn(64)
    got = int4_cpu.Int8Linear(weight, bias)(x)
    expected = F.linear(x, weight, bias)
    assert got.dtype == torch.float32
    assert ((got - expected).abs().max() / expected.abs().max()) < 2e-2
