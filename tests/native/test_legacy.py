"""The legacy types (Q4_0 Q4_1 Q5_0 Q5_1 Q8_0) on every instruction set: the matmul against a
numpy model of its integer arithmetic (codes decoded here from the raw bytes, activations
quantized by the model in integer_model.py), against the dense product with the repo's
reference dequantizer, the dequantizer bit for bit, the prompt path, and multi-part output
into a column slice."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from tests.gguf_blocks import random_weight
from tests.native.integer_model import quantize_row

from rocmforge.gguf.dequant import dequantize

native = pytest.importorskip("rocmforge.native")
ops = native.ops()
pytestmark = pytest.mark.skipif(ops is None, reason=f"native kernels unavailable: {native.unavailable_reason()}")
ISAS = list(ops.available_isas()) if ops is not None else []
ISA_IDS = {"ids": lambda i: native.ISA_NAMES[i]}

TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]
# Block layout (dequant.py's docstring): bytes per block, offset of m (None: no m), of qh
# (None: no fifth bit), of qs, and the offset the codes are stored with.
LAYOUT = {
    T.Q4_0: (18, None, None, 2, 8),
    T.Q4_1: (20, 2, None, 4, 0),
    T.Q5_0: (22, None, 2, 6, 16),
    T.Q5_1: (24, 2, 4, 8, 0),
    T.Q8_0: (34, None, None, 2, 0),
}
# K: one block, a few blocks, a whole number of 8-block groups, groups plus leftovers.
SHAPES = [(m, n, k) for m in (1, 3, 7) for n in (1, 5, 33, 64) for k in (32, 96, 256, 544)]


def decode(raw: np.ndarray, qtype: T) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 ``[n, row_bytes]`` -> ``d [n, nb]``, ``m [n, nb]`` (0 without m) as float64 and
    the signed codes ``q [n, nb, 32]`` (offset removed) as int64."""
    size, m_at, qh_at, qs_at, offset = LAYOUT[qtype]
    n = raw.shape[0]
    blocks = raw.reshape(n, -1, size)
    nb = blocks.shape[1]

    def f16(at: int) -> np.ndarray:
        return blocks[..., at : at + 2].copy().view("<f2")[..., 0].astype(np.float64)

    d = f16(0)
    m = f16(m_at) if m_at is not None else np.zeros_like(d)
    if qtype == T.Q8_0:
        return d, m, blocks[..., qs_at : qs_at + 32].copy().view(np.int8).astype(np.int64)
    qs = blocks[..., qs_at : qs_at + 16].astype(np.int64)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # element j: low nibble of byte j, j+16: high
    if qh_at is not None:
        qh = blocks[..., qh_at : qh_at + 4].astype(np.int64)
        bits = (qh[..., :, None] >> np.arange(8)) & 1  # element 8 * byte + bit
        q = q | (bits.reshape(n, nb, 32) << 4)
    return d, m, q - offset


def model_matmul(x: torch.Tensor, raw: torch.Tensor, qtype: T) -> tuple[np.ndarray, np.ndarray]:
    """The integer model: per block (d_w * d_a) * sum(q * a) + m_w * s_a, in float64.
    Returns ``[M, N]`` results and the sums of the parts' magnitudes (for the tolerance)."""
    d, m, q = decode(raw.numpy(), qtype)
    want = np.empty((x.shape[0], raw.shape[0]))
    scale = np.empty_like(want)
    for i, row in enumerate(x.numpy()):
        act = quantize_row(row, 32)
        isum = np.einsum("nbj,bj->nb", q, act.qs.astype(np.int64))
        scaled, offsets = d * act.d.astype(np.float64) * isum, m * act.s.astype(np.float64)
        want[i] = (scaled + offsets).sum(axis=1)
        scale[i] = (np.abs(scaled) + np.abs(offsets)).sum(axis=1)
    return want, scale


def reference_dense(raw: torch.Tensor, qtype: T, n: int, k: int) -> torch.Tensor:
    return dequantize(raw.reshape(-1), qtype, (n, k), torch.float32)


def activations(m: int, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen) * torch.logspace(-2, 1, m)[:, None]
    if m > 1:
        x[1, :32] = 0.0  # a zero block: d = 0
    if m > 2:
        x[2, 5] = 50.0  # an outlier dominating its block
    return x


def quantized_values(x: torch.Tensor) -> np.ndarray:
    """The values the model's activation blocks stand for (d * q in float32), as float64:
    what the prompt path multiplies."""
    acts = [quantize_row(row, 32) for row in x.numpy()]
    return np.stack([(a.d[:, None] * a.qs.astype(np.float32)).reshape(-1) for a in acts]).astype(np.float64)


def matmul(x: torch.Tensor, raw: torch.Tensor, qtype: T, isa: int) -> torch.Tensor:
    out = torch.empty(x.shape[0], raw.shape[0])
    ops.matmul(x, [raw], [int(qtype)], out, isa)
    return out


@pytest.mark.parametrize("isa", ISAS, **ISA_IDS)
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_matmul_matches_the_integer_model_and_the_dense_product(isa: int, qtype: T) -> None:
    for case, (m, n, k) in enumerate(SHAPES):
        raw = random_weight(qtype, n, k, seed=case)
        x = activations(m, k, seed=100 + case)
        got = matmul(x, raw, qtype, isa).numpy().astype(np.float64)
        want, scale = model_matmul(x, raw, qtype)
        np.testing.assert_array_less(np.abs(got - want), 1e-5 * scale + 1e-30, err_msg=f"model, shape {(m, n, k)}")

        # Against x @ W.T: activation rounding moves each x_j by at most half its block's
        # step d_a / 2, so |error| <= sum_j |W_ij| d_a(j) / 2 (plus float rounding).
        dense = reference_dense(raw, qtype, n, k).double()
        xs = x.numpy()
        half_step = np.stack([np.repeat(quantize_row(row, 32).d.astype(np.float64) / 2, 32) for row in xs])
        bound = half_step @ dense.abs().numpy().T * 1.001 + 1e-5 * (np.abs(xs) @ dense.abs().numpy().T)
        error = np.abs(got - xs.astype(np.float64) @ dense.numpy().T)
        np.testing.assert_array_less(error, bound + 1e-30, err_msg=f"dense, shape {(m, n, k)}")


@pytest.mark.parametrize("isa", ISAS, **ISA_IDS)
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_extreme_codes_do_not_saturate(isa: int, qtype: T) -> None:
    """Every code at an end of its range (Q8_0: -128 and 127) against activation codes of
    +-127: the largest pair sums the integer kernels form."""
    n, k = 9, 544
    raw = random_weight(qtype, n, k, seed=7)
    size, _, qh_at, qs_at, _ = LAYOUT[qtype]
    gen = torch.Generator().manual_seed(8)
    blocks = raw.view(n, -1, size)
    extremes = torch.tensor([0x80, 0x7F] if qtype == T.Q8_0 else [0x00, 0xFF], dtype=torch.uint8)
    for start, length in ((qs_at, 32 if qtype == T.Q8_0 else 16), (qh_at, 4)):
        if start is not None:
            pick = torch.randint(0, 2, (n, blocks.shape[1], length), generator=gen)
            blocks[..., start : start + length] = extremes[pick]
    x = torch.where(torch.rand(3, k, generator=gen) < 0.5, -1.0, 1.0)
    got = matmul(x, raw, qtype, isa).numpy().astype(np.float64)
    want, scale = model_matmul(x, raw, qtype)
    np.testing.assert_array_less(np.abs(got - want), 1e-5 * scale + 1e-30)


@pytest.mark.parametrize("isa", ISAS, **ISA_IDS)
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_is_bit_identical_to_the_reference(isa: int, qtype: T) -> None:
    for case, (n, k) in enumerate([(1, 32), (5, 96), (33, 544), (64, 256)]):
        raw = random_weight(qtype, n, k, seed=200 + case)
        got = ops.dequantize(raw, int(qtype), k, isa)
        want = reference_dense(raw, qtype, n, k)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), f"shape {(n, k)}"


@pytest.mark.parametrize("isa", ISAS, **ISA_IDS)
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_matmul_dequant_is_the_quantized_activations_times_the_dense_weight(isa: int, qtype: T) -> None:
    for case, (m, n, k) in enumerate([(1, 5, 96), (7, 33, 544), (3, 64, 256)]):
        raw = random_weight(qtype, n, k, seed=300 + case)
        x = activations(m, k, seed=400 + case)
        out = torch.empty(m, n)
        ops.matmul_dequant(x, [raw], [int(qtype)], out, max(1, n // 3), isa)
        xq = quantized_values(x)
        dense = reference_dense(raw, qtype, n, k).double().numpy()
        want = xq @ dense.T
        scale = np.abs(xq) @ np.abs(dense).T
        np.testing.assert_array_less(np.abs(out.numpy() - want), 1e-5 * scale + 1e-30, err_msg=f"shape {(m, n, k)}")


@pytest.mark.parametrize("isa", ISAS, **ISA_IDS)
def test_parts_fill_their_columns_of_a_slice(isa: int) -> None:
    m, k, n1, n2 = 3, 288, 21, 11
    w1, w2 = random_weight(T.Q4_0, n1, k, seed=500), random_weight(T.Q8_0, n2, k, seed=501)
    x = activations(m, k, seed=502)
    alone = torch.cat([matmul(x, w1, T.Q4_0, isa), matmul(x, w2, T.Q8_0, isa)], dim=1)

    for prompt in (False, True):
        wide = torch.full((m, n1 + n2 + 7), -12345.0)
        out = wide[:, 3 : 3 + n1 + n2]
        assert out.stride(0) > out.shape[1]
        if prompt:
            ops.matmul_dequant(x, [w1, w2], [int(T.Q4_0), int(T.Q8_0)], out, 4, isa)
            dense = torch.cat([reference_dense(w1, T.Q4_0, n1, k), reference_dense(w2, T.Q8_0, n2, k)]).double()
            xq = quantized_values(x)
            want = xq @ dense.numpy().T
            scale = np.abs(xq) @ np.abs(dense.numpy()).T
            np.testing.assert_array_less(np.abs(out.numpy() - want), 1e-5 * scale + 1e-30)
        else:
            ops.matmul(x, [w1, w2], [int(T.Q4_0), int(T.Q8_0)], out, isa)
            assert torch.equal(out, alone)
        assert torch.all(wide[:, :3] == -12345.0) and torch.all(wide[:, 3 + n1 + n2 :] == -12345.0)

