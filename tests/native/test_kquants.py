"""K-quant kernels (Q4_K Q5_K Q6_K dot products; Q2_K..Q6_K dequantization) of every
instruction set, against a numpy model that decodes the blocks from their bytes (the layouts
in rocmforge.gguf.dequant's docstring) and against the reference dequantizer."""

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

DOT_TYPES = [T.Q4_K, T.Q5_K, T.Q6_K]
ALL_TYPES = [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]
SHAPES = [(m, n, k) for m in (1, 3, 7) for n in (1, 5, 33) for k in (256, 768)]


# --- the numpy model: blocks decoded from their bytes ------------------------------------


def _f16(blocks: np.ndarray, offset: int) -> np.ndarray:
    return blocks[..., offset : offset + 2].copy().view(np.float16)[..., 0].astype(np.float64)


def _k_scales_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """12 bytes per block -> 8 scales and 8 mins (6 bits each), as the layout table reads."""
    p = packed.astype(np.int64)
    scale = np.empty(p.shape[:-1] + (8,), np.int64)
    mins = np.empty_like(scale)
    for i in range(4):
        scale[..., i] = p[..., i] & 63
        mins[..., i] = p[..., 4 + i] & 63
        scale[..., 4 + i] = (p[..., 8 + i] & 15) | ((p[..., i] >> 6) << 4)
        mins[..., 4 + i] = (p[..., 8 + i] >> 4) | ((p[..., 4 + i] >> 6) << 4)
    return scale, mins


def _nibble_codes(qs: np.ndarray) -> np.ndarray:
    """128 bytes -> 256 codes: element 64c + 32s + j = nibble s of byte 32c + j."""
    q = qs.astype(np.int64).reshape(qs.shape[:-1] + (4, 1, 32))
    return np.concatenate([q & 15, q >> 4], axis=-2).reshape(qs.shape[:-1] + (256,))


def decode(raw: torch.Tensor, qtype: T, k: int) -> dict[str, np.ndarray]:
    """uint8 [n, row_bytes] -> per block (axes n, block): float64 scale fields, int64 codes
    [.., 256] and sub-block scales / mins, the codes unsigned (Q6_K without its -32)."""
    size = {T.Q4_K: 144, T.Q5_K: 176, T.Q6_K: 210}[qtype]
    blocks = raw.numpy().reshape(raw.shape[0], k // 256, size)
    if qtype == T.Q6_K:
        ql = blocks[..., 0:128].astype(np.int64).reshape(blocks.shape[:2] + (2, 1, 64))
        low = np.concatenate([ql & 15, ql >> 4], axis=-2).reshape(blocks.shape[:2] + (256,))
        qh = blocks[..., 128:192].astype(np.int64).reshape(blocks.shape[:2] + (2, 1, 32))
        high = np.concatenate([(qh >> (2 * t)) & 3 for t in range(4)], axis=-2).reshape(blocks.shape[:2] + (256,))
        return {
            "d": _f16(blocks, 208),
            "codes": low | (high << 4),
            "scales": blocks[..., 192:208].view(np.int8).astype(np.int64),
        }
    scale, mins = _k_scales_mins(blocks[..., 4:16])
    codes = _nibble_codes(blocks[..., -128:])
    if qtype == T.Q5_K:
        qh = blocks[..., 16:48].astype(np.int64)
        codes = codes | np.concatenate([((qh >> s) & 1) << 4 for s in range(8)], axis=-1)
    return {"d": _f16(blocks, 0), "dmin": _f16(blocks, 2), "codes": codes, "scales": scale, "mins": mins}


def model_matmul(x: torch.Tensor, raw: torch.Tensor, qtype: T) -> tuple[np.ndarray, np.ndarray]:
    """The integer model of x @ w.T: per block exact integer sums, scaled in float64.
    Returns the result [m, n] and the sum of the absolute values of its terms (one per
    element and per min offset: the scale of float rounding in any summation order)."""
    k = x.shape[1]
    w = decode(raw, qtype, k)
    n, nb = w["d"].shape
    acts = [quantize_row(row, 256) for row in x.numpy()]
    da = np.stack([a.d for a in acts]).astype(np.float64)  # [m, nb]
    qa = np.stack([a.qs for a in acts]).astype(np.int64)  # [m, nb, 256]
    bsums = np.stack([a.bsums for a in acts]).astype(np.int64)  # [m, nb, 16]
    scale = w["d"][None] * da[:, None]  # [m, n, nb]
    a_abs = np.abs(da[:, :, None] * qa).reshape(len(acts), k)
    if qtype == T.Q6_K:
        codes = w["codes"].reshape(n, nb, 16, 16)
        isum = np.einsum("nbgi,mbgi->mnbg", codes, qa.reshape(-1, nb, 16, 16))
        result = (scale * (w["scales"][None] * (isum - 32 * bsums[:, None])).sum(axis=-1)).sum(axis=-1)
        w_abs = np.abs(w["d"][..., None, None] * w["scales"][..., None] * (codes - 32)).reshape(n, k)
        return result, a_abs @ w_abs.T
    codes = w["codes"].reshape(n, nb, 8, 32)
    isum = np.einsum("nbji,mbji->mnbj", codes, qa.reshape(-1, nb, 8, 32))
    bsum32 = bsums.reshape(-1, nb, 8, 2).sum(axis=-1)
    scaled = scale * (w["scales"][None] * isum).sum(axis=-1)
    mins = w["dmin"][None] * da[:, None] * (w["mins"][None] * bsum32[:, None]).sum(axis=-1)
    w_abs = np.abs(w["d"][..., None, None] * w["scales"][..., None] * codes) + np.abs(
        w["dmin"][..., None, None] * w["mins"][..., None]
    )
    return (scaled - mins).sum(axis=-1), a_abs @ w_abs.reshape(n, k).T


def model_act_values(x: torch.Tensor) -> np.ndarray:
    """The float32 values the quantized activations stand for (d * q), [m, k]."""
    rows = []
    for row in x.numpy():
        a = quantize_row(row, 256)
        rows.append((a.d[:, None] * a.qs.astype(np.float32)).astype(np.float32).reshape(-1))
    return np.stack(rows)


# --- inputs --------------------------------------------------------------------------------


def weight(qtype: T, n: int, k: int, seed: int) -> torch.Tensor:
    """Random blocks at an odd address (as a mapped file gives them): no alignment assumed."""
    raw = random_weight(qtype, n, k, seed)
    buf = torch.empty(raw.numel() + 1, dtype=torch.uint8)
    shifted = buf[1:].view(raw.shape)
    shifted.copy_(raw)
    return shifted


def activations(m: int, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen) * torch.logspace(-2, 1, m)[:, None]
    if m > 2:
        x[1] = 0.0  # an all-zero row: d = 0
        x[2, 5] = x[2].abs().max() * 20  # an outlier dominating its block
    return x


def reference(raw: torch.Tensor, qtype: T, k: int) -> torch.Tensor:
    # A copy: the reference views fp16 fields in place, which needs an even byte offset.
    return dequantize(raw.clone().reshape(-1), qtype, (raw.shape[0], k), torch.float32)


# --- tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("isa", ISAS, **ISA_IDS)
@pytest.mark.parametrize("qtype", DOT_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
def test_matmul_matches_the_integer_model_and_the_dense_product(isa: int, qtype: T, m: int, n: int, k: int) -> None:
    raw = weight(qtype, n, k, seed=10 * n + k + qtype)
    x = activations(m, k, seed=m + n + k)
    out = torch.full((m, n), float("nan"))
    ops.matmul(x, [raw], [int(qtype)], out, isa)
    got = out.numpy().astype(np.float64)

    want, magnitude = model_matmul(x, raw, qtype)
    np.testing.assert_array_less(np.abs(got - want), 1e-5 * magnitude + 1e-30)

    # Against the dense product: the only difference is the 8-bit activation rounding, an
    # error of about d_a / sqrt(12) per element; 6 standard deviations of it (a wrong scale
    # index or a misplaced code is off by a fair fraction of the whole value).
    dense = reference(raw, qtype, k).double().numpy()
    da = np.stack([quantize_row(row, 256).d for row in x.numpy()]).astype(np.float64)
    step = np.repeat(da, 256, axis=1)  # [m, k]
    sigma = np.sqrt((step**2 / 12) @ (dense**2).T)
    exact = x.double().numpy() @ dense.T
    np.testing.assert_array_less(
        np.abs(got - exact), 6 * sigma + 1e-5 * (np.abs(x.double().numpy()) @ np.abs(dense).T) + 1e-30
    )


@pytest.mark.parametrize("isa", ISAS, **ISA_IDS)
@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize(("n", "k"), [(1, 256), (5, 768), (33, 512)])
def test_dequantize_is_bit_identical_to_the_reference(isa: int, qtype: T, n: int, k: int) -> None:
    raw = weight(qtype, n, k, seed=7 * n + k + qtype)
    got = ops.dequantize(raw, int(qtype), k, isa)
    assert torch.equal(got.view(torch.int32), reference(raw, qtype, k).view(torch.int32))


@pytest.mark.parametrize("isa", ISAS, **ISA_IDS)
@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize(("m", "n", "k"), [(1, 5, 256), (3, 33, 768), (7, 33, 256)])
def test_matmul_dequant_is_the_dense_product_of_the_activations_it_quantizes(
    isa: int, qtype: T, m: int, n: int, k: int
) -> None:
    raw = weight(qtype, n, k, seed=3 * n + k + qtype)
    x = activations(m, k, seed=2 * m + k)
    out = torch.full((m, n), float("nan"))
    ops.matmul_dequant(x, [raw], [int(qtype)], out, 4, isa)
    dense = reference(raw, qtype, k).double().numpy()
    # Types with a dot product see the activations as `matmul` quantizes them; Q2_K / Q3_K
    # (dequantize only) see them as they are.
    lhs = model_act_values(x).astype(np.float64) if qtype in DOT_TYPES else x.double().numpy()
    want = lhs @ dense.T
    np.testing.assert_array_less(np.abs(out.double().numpy() - want), 1e-5 * (np.abs(lhs) @ np.abs(dense).T) + 1e-30)


@pytest.mark.parametrize("isa", ISAS, **ISA_IDS)
def test_mixed_parts_fill_their_own_columns(isa: int) -> None:
    """A Q4_K_M attention weight: Q|K as Q4_K and V as Q6_K, into one output and into a
    column slice of a wider one."""
    k = 512
    parts = [weight(T.Q4_K, 9, k, seed=1), weight(T.Q6_K, 5, k, seed=2)]
    types = [int(T.Q4_K), int(T.Q6_K)]
    x = activations(3, k, seed=3)
    separate = []
    for raw, qtype in zip(parts, types):
        out = torch.empty(3, raw.shape[0])
        ops.matmul(x, [raw], [qtype], out, isa)
        separate.append(out)
    fused = torch.empty(3, 14)
    ops.matmul(x, parts, types, fused, isa)
    assert torch.equal(fused, torch.cat(separate, dim=1))

    wide = torch.full((3, 20), float("nan"))
    ops.matmul(x, parts, types, wide[:, 4:18], isa)
    assert torch.equal(wide[:, 4:18], fused)
    assert wide[:, :4].isnan().all() and wide[:, 18:].isnan().all()

    wide = torch.full((3, 20), float("nan"))
    ops.matmul_dequant(x, parts, types, wide[:, 4:18], 4, isa)
    torch.testing.assert_close(wide[:, 4:18], fused, rtol=1e-5, atol=1e-5 * fused.abs().max().item())
    assert wide[:, :4].isnan().all() and wide[:, 18:].isnan().all()


@pytest.mark.parametrize("qtype", [T.Q2_K, T.Q3_K], ids=lambda t: t.name)
def test_dequantize_only_types_have_no_matmul(qtype: T) -> None:
    raw = weight(qtype, 2, 256, seed=0)
    with pytest.raises(RuntimeError, match="no CPU matmul kernel"):
        ops.matmul(torch.ones(1, 256), [raw], [int(qtype)], torch.empty(1, 2))
