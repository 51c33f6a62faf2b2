"""The quantized-weight matmul kernels and GGUFLinear against dequantize-then-matmul.

Weights are random valid GGUF blocks: random code bytes with every fp16 scale field set to
a finite value of moderate magnitude and random sign. Without a GPU the kernels run on
CPU tensors through Triton's interpreter, so shapes stay small but ragged: N and M are not
multiples of the tiles, K not always a multiple of BLOCK_K, K-quant tiles cover part of
a super-block. Float32 activations are checked tightly (one wrong code among K changes
an output by far more than the tolerance); float16/bfloat16 within the rounding their
casts allow. The tests marked ``gpu`` run real shapes natively.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as T
from gguf_blocks import random_weight

from rocmforge.gguf.dequant import dequantize
from rocmforge.kernels.quant_matmul import (
    GEMV_MAX_M,
    SUPPORTED_TYPES,
    GemvConfig,
    TiledConfig,
    quant_matmul,
    reference_quant_matmul,
)
from rocmforge.quant.gguf_linear import GGUFLinear

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TYPES = sorted(SUPPORTED_TYPES, key=lambda qtype: qtype.value)
K_QUANTS = {T.Q4_K, T.Q5_K, T.Q6_K}

# |kernel - float32 reference| <= TOLERANCE * (|x| @ |W|.T): summation order in float32;
# for 16-bit activations the weight tile rounded to x.dtype plus the rounded output.
TOLERANCE = {torch.float32: 2.0**-16, torch.float16: 2.0**-9, torch.bfloat16: 2.0**-7}


def _random_weight(
    qtype: T, n: int, k: int, seed: int, device: torch.device = DEVICE
) -> torch.Tensor:
    return random_weight(qtype, n, k, seed).to(device)


def _random_x(m: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=gen).to(dtype).to(DEVICE)


def _assert_matches(
    got: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, qtype: T, slack: float = 1.0
) -> None:
    """``got`` within ``slack`` times the dtype's tolerance of the float32 reference."""
    n, k = weight.shape[0], x.shape[1]
    dense = dequantize(weight.reshape(-1), qtype, (n, k))
    expected = x.float() @ dense.T
    bound = slack * TOLERANCE[x.dtype] * (x.float().abs() @ dense.abs().T) + 1e-30
    assert got.dtype == x.dtype and got.shape == expected.shape
    error = (got.float() - expected).abs()
    assert torch.isfinite(got).all()
    worst = (error / bound).max().item()
    assert worst <= 1.0, f"error reaches {worst:.3g}x the tolerance"


def _k(qtype: T) -> int:
    """Row length: 512 for K-quants (two super-blocks), 96 for 32-blocks (ragged vs 64)."""
    return 512 if qtype in K_QUANTS else 96


def _gemv(qtype: T) -> GemvConfig:
    """Ragged tiles: 8 rows (M=3, 17), 32 columns (N=40), K tiles of half a super-block."""
    return GemvConfig(block_m=8, block_n=32, block_k=128 if qtype in K_QUANTS else 64, split_k=2)


def _tiled(qtype: T) -> TiledConfig:
    return TiledConfig(block_m=16, block_n=32, block_k=256 if qtype in K_QUANTS else 64)


# --- the kernels --------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", TYPES, ids=lambda qtype: qtype.name)
@pytest.mark.parametrize("path", ["gemv", "tiled"])
@pytest.mark.parametrize("m", [1, 3, 17])
def test_float32_matches_reference(qtype: T, path: str, m: int) -> None:
    n, k = 40, _k(qtype)
    seed = qtype.value * 100 + m
    weight = _random_weight(qtype, n, k, seed)
    x = _random_x(m, k, torch.float32, seed)
    config = _gemv(qtype) if path == "gemv" else _tiled(qtype)

    got = quant_matmul(x, weight, qtype, config=config)

    _assert_matches(got, x, weight, qtype)
    torch.testing.assert_close(got, reference_quant_matmul(x, weight, qtype), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda qtype: qtype.name)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("m", [GEMV_MAX_M - 1, 17], ids=["gemv", "tiled"])
def test_16bit_default_configs_match_reference(qtype: T, dtype: torch.dtype, m: int) -> None:
    """The default launch choices (GEMV for few rows, tl.dot tiles above), N=72, K=256."""
    n, k = 72, 256
    seed = qtype.value * 100 + m + 7
    weight = _random_weight(qtype, n, k, seed)
    x = _random_x(m, k, dtype, seed)

    _assert_matches(quant_matmul(x, weight, qtype), x, weight, qtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_default_gemv_on_one_strip_splits_k(dtype: torch.dtype) -> None:
    """M=1, N=24 is one program, so the default config splits K (one CPU "multiprocessor"
    wants four programs): the partial sums meet in the float32 workspace."""
    qtype, n, k = T.Q4_K, 24, 512
    weight = _random_weight(qtype, n, k, seed=3)
    x = _random_x(1, k, dtype, seed=3)

    _assert_matches(quant_matmul(x, weight, qtype), x, weight, qtype)


@pytest.mark.parametrize(
    "config",
    [
        GemvConfig(block_m=2, block_n=16, block_k=64, split_k=3),
        TiledConfig(block_m=16, block_n=16, block_k=32),
    ],
    ids=["gemv-split3", "tiled"],
)
def test_writes_into_a_column_slice_with_strided_x(config: GemvConfig | TiledConfig) -> None:
    qtype, m, n, k = T.Q6_K, 3, 24, 256
    weight = _random_weight(qtype, n, k, seed=5)
    x = _random_x(k, m, torch.float32, seed=5).T  # column-major [m, k]
    wide = torch.full((m, n + 12), float("nan"), device=DEVICE)

    got = quant_matmul(x, weight, qtype, out=wide[:, 8 : 8 + n], config=config)

    assert got.data_ptr() == wide[:, 8:].data_ptr()
    _assert_matches(wide[:, 8 : 8 + n], x, weight, qtype)
    assert wide[:, :8].isnan().all() and wide[:, 8 + n :].isnan().all()


@pytest.mark.parametrize(
    "config",
    [GemvConfig(block_m=2, block_k=64), TiledConfig(block_m=16, block_n=16, block_k=64)],
    ids=["gemv", "tiled"],
)
def test_ragged_k_reads_nothing_past_the_row(config: GemvConfig | TiledConfig) -> None:
    """K = 96 in 64-column tiles: x is a view into NaN padding, so a load past column K
    would poison the result; the weight rows are strided (every other row)."""
    qtype, m, k = T.Q4_0, 2, 96
    weight = _random_weight(qtype, 20, k, seed=9)[::2]
    padded = torch.full((m, k + 64), float("nan"), device=DEVICE)
    padded[:, :k] = _random_x(m, k, torch.float32, seed=9)
    x = padded[:, :k]

    _assert_matches(quant_matmul(x, weight, qtype, config=config), x, weight, qtype)
    assert quant_matmul(x[:0], weight, qtype, config=config).shape == (0, 10)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"qtype": T.Q2_K}, "does not support Q2_K"),
        ({"qtype": T.F16}, "does not support F16"),
        ({"qtype": 12345}, "unknown GGML tensor type"),
        ({"k": 288}, "multiple of 256"),
        ({"qtype": T.Q8_0, "k": 48}, "multiple of 32"),
        ({"x_dtype": torch.int32}, "float32, float16 or bfloat16"),
        ({"x_shape": (2, 3, 256)}, "2-D"),
        ({"weight_cols": 100}, "takes 144 bytes"),
        ({"weight_dtype": torch.int8}, "uint8"),
        ({"out_shape": (2, 5)}, "out must be"),
        ({"out_dtype": torch.float16}, "out must be"),
        ({"config": TiledConfig(block_k=48)}, "block_k must be a power of two"),
        ({"config": TiledConfig(block_m=8)}, "block_m must be a power of two >= 16"),
        ({"config": GemvConfig(split_k=0)}, "split_k must be >= 1"),
    ],
)
def test_invalid_arguments_raise_value_error(kwargs: dict, message: str) -> None:
    qtype = kwargs.get("qtype", T.Q4_K)
    k = kwargs.get("k", 256)
    x = torch.zeros(
        kwargs.get("x_shape", (2, k)), dtype=kwargs.get("x_dtype", torch.float32), device=DEVICE
    )
    weight = torch.zeros(
        (4, kwargs.get("weight_cols", 144)),
        dtype=kwargs.get("weight_dtype", torch.uint8),
        device=DEVICE,
    )
    out = torch.zeros(
        kwargs.get("out_shape", (2, 4)), dtype=kwargs.get("out_dtype", torch.float32), device=DEVICE
    )
    with pytest.raises(ValueError, match=message):
        quant_matmul(x, weight, qtype, out=out, config=kwargs.get("config"))


# --- GGUFLinear ---------------------------------------------------------------------------


def _mixed_parts(k: int, seed: int, device: torch.device = DEVICE) -> list[tuple[torch.Tensor, T]]:
    """A Q4_K_M-style fused QKV: Q4_K q and k, Q6_K v (ragged row counts)."""
    return [
        (_random_weight(T.Q4_K, 24, k, seed, device), T.Q4_K),
        (_random_weight(T.Q4_K, 8, k, seed + 1, device), T.Q4_K),
        (_random_weight(T.Q6_K, 12, k, seed + 2, device), T.Q6_K),
    ]


def test_gguf_linear_mixed_parts_match_dense() -> None:
    k = 256
    parts = _mixed_parts(k, seed=11)
    bias = torch.randn(44, generator=torch.Generator().manual_seed(11)).to(DEVICE)
    layer = GGUFLinear(parts, in_features=k, bias=bias)
    x = _random_x(6, k, torch.float32, seed=12).reshape(2, 3, k)

    got = layer(x)

    assert (layer.in_features, layer.out_features) == (k, 44)
    assert [name for name, _ in layer.named_buffers()] == ["weight_0", "weight_1"]
    assert layer.weight_bytes == sum(part.numel() for part, _ in parts)
    dense = torch.cat([dequantize(p.reshape(-1), t, (p.shape[0], k)) for p, t in parts])
    torch.testing.assert_close(layer.dequantize(), dense, rtol=0, atol=0)
    expected = F.linear(x, dense, bias)
    assert got.shape == (2, 3, 44) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("parts_seed", [21, 22])
def test_gguf_linear_dense_path_for_prefill_sized_batches(parts_seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """From ``dense_min_rows`` rows on, each buffer is dequantized and multiplied densely:
    the same result, into a column slice when the layer has several buffers."""
    from rocmforge.kernels import gguf_dequant

    dequantized: list[T] = []
    real = gguf_dequant.dequantize_weight

    def spy(weight, ggml_type, in_features, dtype):
        dequantized.append(ggml_type)
        return real(weight, ggml_type, in_features, dtype)

    monkeypatch.setattr(gguf_dequant, "dequantize_weight", spy)
    k = 256
    parts = _mixed_parts(k, seed=parts_seed)
    if parts_seed == 22:
        parts = parts[:2]  # one Q4_K buffer: the GEMM writes the output directly
    layer = GGUFLinear(parts, in_features=k)
    x = _random_x(9, k, torch.float32, seed=parts_seed)
    dense = layer.dequantize()
    quantized = layer(x)
    assert not dequantized  # 9 rows: the quantized kernels
    densely = layer(x, dense_min_rows=8)
    assert dequantized == [t for t, _ in itertools.groupby(t for _, t in parts)]  # once per buffer
    torch.testing.assert_close(densely, x @ dense.T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(densely, quantized, rtol=1e-4, atol=1e-4)


def test_gguf_linear_bfloat16_and_permuted_rows() -> None:
    """Rows permuted before construction give the permuted dense weight, exactly."""
    k = 256
    weight = _random_weight(T.Q5_K, 20, k, seed=13)
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(13)).to(DEVICE)
    layer = GGUFLinear([(weight[perm], T.Q5_K)], in_features=k)
    dense = dequantize(weight.reshape(-1), T.Q5_K, (20, k))
    torch.testing.assert_close(layer.dequantize(), dense[perm], rtol=0, atol=0)

    x = _random_x(17, k, torch.bfloat16, seed=14)
    got = layer(x)

    _assert_matches(got, x, weight[perm], T.Q5_K)


def test_gguf_linear_supports_and_rejects() -> None:
    assert GGUFLinear.supports(T.Q4_K, 4096)
    assert GGUFLinear.supports(T.Q8_0, 96)
    assert not GGUFLinear.supports(T.Q4_K, 96)
    assert not GGUFLinear.supports(T.Q2_K, 4096)
    assert not GGUFLinear.supports(T.F16, 4096)
    assert not GGUFLinear.supports(12345, 4096)
    assert not GGUFLinear.supports(T.Q8_0, 0)

    good = torch.zeros(4, 144, dtype=torch.uint8)
    with pytest.raises(ValueError, match="at least one"):
        GGUFLinear([], in_features=256)
    with pytest.raises(ValueError, match="part 1: type"):
        GGUFLinear(
            [(good, T.Q4_K), (torch.zeros(4, 84, dtype=torch.uint8), T.Q2_K)], in_features=256
        )
    with pytest.raises(ValueError, match=r"part 0: expected a uint8 \[rows, 144\]"):
        GGUFLinear([(torch.zeros(4, 140, dtype=torch.uint8), T.Q4_K)], in_features=256)
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\)"):
        GGUFLinear([(good, T.Q4_K)], in_features=256, bias=torch.zeros(5))
    with pytest.raises(ValueError, match=r"expected input \[\.\.\., 256\]"):
        GGUFLinear([(good, T.Q4_K)], in_features=256)(torch.zeros(2, 128))


# --- real shapes on a GPU -----------------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA/ROCm device")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("qtype", TYPES, ids=lambda qtype: qtype.name)
@pytest.mark.parametrize("m", [1, 512])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_gpu_real_shapes(qtype: T, m: int, dtype: torch.dtype) -> None:
    n = k = 4096
    weight = _random_weight(qtype, n, k, seed=qtype.value, device=torch.device("cuda"))
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype).cuda()

    # float32: rounding grows with K (4096 here against 512 in the small tests).
    slack = 8.0 if dtype == torch.float32 else 1.0
    _assert_matches(quant_matmul(x, weight, qtype), x, weight, qtype, slack)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("m", [1, 3, 64])
def test_gpu_no_host_sync_and_split_k(m: int) -> None:
    """Small N forces split-K on a real device; no call synchronises with the host."""
    qtype, n, k = T.Q4_K, 256, 4096
    weight = _random_weight(qtype, n, k, seed=m, device=torch.device("cuda"))
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    wide = torch.full((m, n + 64), float("nan"), device="cuda", dtype=torch.bfloat16)
    quant_matmul(x, weight, qtype, out=wide[:, 32 : 32 + n])  # compile outside the check
    torch.cuda.set_sync_debug_mode("error")
    try:
        quant_matmul(x, weight, qtype, out=wide[:, 32 : 32 + n])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    _assert_matches(wide[:, 32 : 32 + n], x, weight, qtype)
    assert wide[:, :32].isnan().all() and wide[:, 32 + n :].isnan().all()


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("tokens", [1, 300])
def test_gpu_gguf_linear_real_shape(tokens: int) -> None:
    k = 4096
    cuda = torch.device("cuda")
    parts = [
        (_random_weight(T.Q4_K, 4096, k, 1, cuda), T.Q4_K),
        (_random_weight(T.Q4_K, 1024, k, 2, cuda), T.Q4_K),
        (_random_weight(T.Q6_K, 1024, k, 3, cuda), T.Q6_K),
    ]
    bias = torch.randn(6144, device=cuda, dtype=torch.bfloat16)
    layer = GGUFLinear(parts, in_features=k, bias=bias)
    x = torch.randn(tokens, k, device=cuda, dtype=torch.bfloat16)

    got = layer(x)

    expected = F.linear(x.float(), layer.dequantize(), bias.float())
    bound = TOLERANCE[torch.bfloat16] * (
        x.float().abs() @ layer.dequantize().abs().T + bias.float().abs()
    )
    assert ((got.float() - expected).abs() <= bound + 1e-30).all()
