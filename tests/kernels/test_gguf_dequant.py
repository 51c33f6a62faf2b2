"""The Triton dequantization kernel against the torch reference (itself bit-exact with
gguf-py): bit for bit in float32, equal after rounding in float16/bfloat16."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf_blocks import random_weight

from rocmforge.gguf.dequant import dequantize
from rocmforge.kernels.gguf_decode import DECODERS
from rocmforge.kernels.gguf_dequant import dequantize_weight

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TYPES = sorted(DECODERS, key=lambda qtype: qtype.value)


def _k(qtype: T) -> int:
    """Rows of two super-blocks for the K-quants; three 32-blocks (a ragged 256-tile) else."""
    return 512 if qtype in (T.Q4_K, T.Q5_K, T.Q6_K) else 96


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_float32_is_bit_exact(qtype: T) -> None:
    k = _k(qtype)
    weight = random_weight(qtype, 21, k, seed=qtype.value)
    expected = dequantize(weight.reshape(-1), qtype, (21, k), dtype=torch.float32)
    got = dequantize_weight(weight.to(DEVICE), qtype, k, torch.float32).cpu()
    assert torch.equal(got.view(torch.int32), expected.view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_K, T.Q6_K], ids=lambda t: t.name)
def test_half_precision_is_the_rounded_reference(qtype: T, dtype: torch.dtype) -> None:
    k = _k(qtype)
    weight = random_weight(qtype, 7, k, seed=3)
    expected = dequantize(weight.reshape(-1), qtype, (7, k), dtype=torch.float32).to(dtype)
    got = dequantize_weight(weight.to(DEVICE), qtype, k, dtype).cpu()
    assert got.dtype == dtype
    # The interpreter rounds fp32 -> bf16 by truncation (one ulp at most); a GPU rounds to nearest.
    assert torch.allclose(got.float(), expected.float(), rtol=2 ** -7 if dtype == torch.bfloat16 else 0, atol=0)


def test_bad_inputs_are_value_errors() -> None:
    weight = random_weight(T.Q8_0, 2, 64, seed=0).to(DEVICE)
    with pytest.raises(ValueError):
        dequantize_weight(weight, T.Q2_K, 256, torch.float32)  # no decoder
    with pytest.raises(ValueError):
        dequantize_weight(weight, T.Q8_0, 96, torch.float32)  # rows are 64 elements
    with pytest.raises(ValueError):
        dequantize_weight(weight, T.Q8_0, 64, torch.int8)
    with pytest.raises(ValueError):
        dequantize_weight(weight.float(), T.Q8_0, 64, torch.float32)
