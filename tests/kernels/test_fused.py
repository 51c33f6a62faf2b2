"""The fused small-op kernels (RMSNorm + residual add, RoPE + KV-cache write, SiLU-and-mul)
against their plain torch references, on fresh random inputs seeded per case.

Cases: fp32, bf16 and fp16; odd sizes (hidden 72 and SmolLM2's 576, head_dim 24 whose 12
pairs fill no power of two, intermediate sizes that split into several column blocks); q/k
and v as the column slices of the QKV projection the model hands over; GQA and MHA head
layouts; shuffled slot mappings with -1 padding (the cache row just before the cache, where
a -1 slot would land, must stay untouched, as must every row no token owns); cache dtypes
other than the activations'; inputs never modified; ``ValueError`` on bad shapes.

Accuracy is counted in units in the last place (ulps) of the output dtype. Copies, sums and
RoPE's products round exactly as torch does (0 ulps), except that Triton's CPU interpreter
truncates fp32 -> bf16 where a GPU rounds to nearest: 1 ulp there. Reductions (RMSNorm) and
``exp`` (SiLU) are allowed a few ulps. Without a GPU the kernels run through the interpreter
(``tests/conftest.py``), so shapes stay small; the realistic ones are marked ``gpu``.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import pytest
import torch

pytest.importorskip("triton")

from rocmforge.kernels import kernels_usable
from rocmforge.kernels.fused import (
    apply_rotary_and_write_kv,
    apply_rotary_and_write_kv_reference,
    rms_norm,
    rms_norm_reference,
    silu_and_mul,
    silu_and_mul_reference,
)
from rocmforge.models.layers import RotaryEmbedding

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRETED = DEVICE.type == "cpu"
pytestmark = pytest.mark.skipif(
    not kernels_usable(DEVICE), reason=f"Triton kernels cannot run on {DEVICE} (no GPU, no interpreter)"
)
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA/ROCm device")
f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
MANTISSA_BITS = {f32: 23, f16: 10, bf16: 7}
EPS = 1e-5


def _rounding_ulps(dtype: torch.dtype) -> int:
    """What one fp32 -> dtype conversion may differ from torch's by (see the docstring)."""
    return 1 if dtype == bf16 and INTERPRETED else 0


NORM_ULPS = {f32: 8, f16: 2, bf16: 2 + _rounding_ulps(bf16)}
SILU_ULPS = {f32: 8, f16: 1, bf16: 1 + _rounding_ulps(bf16)}


def _generator(*case: object) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))


def _randn(gen: torch.Generator, *shape: int, dtype: torch.dtype = f32, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * scale).to(device=DEVICE, dtype=dtype)


def assert_within_ulps(actual: torch.Tensor, expected: torch.Tensor, ulps: int) -> None:
    """``|actual - expected| <= ulps * ulp(expected)`` elementwise, ulp in expected's dtype."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (actual.shape, actual.dtype)
    assert bool(torch.isfinite(actual).all()), "non-finite output"
    exp_d, act_d = expected.double(), actual.double()
    _, exponent = torch.frexp(exp_d.abs().clamp_min(torch.finfo(expected.dtype).tiny))
    ulp = torch.ldexp(torch.ones_like(exp_d), exponent - 1 - MANTISSA_BITS[expected.dtype])
    worst = float(((act_d - exp_d).abs() / ulp).max()) if expected.numel() else 0.0
    assert worst <= ulps, f"off by {worst:.1f} ulps (allowed {ulps})"


# --- RMSNorm (+ residual add) ---------------------------------------------------------------


def _norm_inputs(gen: torch.Generator, rows: int, hidden: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    # Rows of very different scale; at 1e-3 the mean square (1e-6) is below eps, so eps counts.
    scales = torch.tensor([1.0, 1e-3, 30.0, 0.5, 4.0, 2.0, 0.1])[:rows, None]
    x = (torch.randn(rows, hidden, generator=gen) * scales).to(DEVICE, dtype)
    residual = _randn(gen, rows, hidden, dtype=dtype)
    weight = _randn(gen, hidden, dtype=dtype)
    return x, residual, weight


@pytest.mark.parametrize("hidden", [72, 576])
@pytest.mark.parametrize("dtype", [f32, bf16, f16])
def test_rms_norm_matches_reference(dtype: torch.dtype, hidden: int) -> None:
    x, _, weight = _norm_inputs(_generator("norm", dtype, hidden), 5, hidden, dtype)
    x_before = x.clone()
    out = rms_norm(x, weight, EPS)
    assert isinstance(out, torch.Tensor)
    assert_within_ulps(out, rms_norm_reference(x, weight, EPS), NORM_ULPS[dtype])
    assert torch.equal(x, x_before)


@pytest.mark.parametrize("hidden", [72, 576])
@pytest.mark.parametrize("dtype", [f32, bf16, f16])
def test_rms_norm_with_residual_matches_reference(dtype: torch.dtype, hidden: int) -> None:
    x, residual, weight = _norm_inputs(_generator("add-norm", dtype, hidden), 5, hidden, dtype)
    x_before, residual_before = x.clone(), residual.clone()
    result = rms_norm(x, weight, EPS, residual=residual)
    assert isinstance(result, tuple)
    out, total = result
    expected_out, expected_total = rms_norm_reference(x, weight, EPS, residual=residual)
    assert_within_ulps(total, expected_total, _rounding_ulps(dtype))
    # The norm of the sum the kernel stored (equal to expected_total except for the
    # interpreter's bf16 truncation, which would otherwise be counted twice).
    assert_within_ulps(out, rms_norm_reference(total, weight, EPS), NORM_ULPS[dtype])
    assert_within_ulps(out, expected_out, NORM_ULPS[dtype] + 2 * _rounding_ulps(dtype))
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before)  # out of place
    assert out.data_ptr() != x.data_ptr() and total.data_ptr() != residual.data_ptr()


def test_rms_norm_strided_and_batched_inputs() -> None:
    """A column window of a wider tensor (row stride != hidden, odd offset) and a 3-D batch
    with a transposed residual."""
    gen = _generator("norm-strided")
    hidden = 576
    wide = _randn(gen, 4, hidden + 9, dtype=bf16)
    x = wide[:, 3 : 3 + hidden]
    weight = _randn(gen, hidden, dtype=bf16)
    assert_within_ulps(rms_norm(x, weight, EPS), rms_norm_reference(x, weight, EPS), NORM_ULPS[bf16])

    x3 = _randn(gen, 2, 3, hidden, dtype=f32)
    residual3 = _randn(gen, 3, 2, hidden, dtype=f32).transpose(0, 1)
    out, total = rms_norm(x3, weight.float(), EPS, residual=residual3)
    expected_out, expected_total = rms_norm_reference(x3, weight.float(), EPS, residual=residual3)
    assert total.shape == out.shape == (2, 3, hidden)
    assert torch.equal(total, expected_total)
    assert_within_ulps(out, expected_out, NORM_ULPS[f32])


def test_rms_norm_rejects_bad_inputs() -> None:
    x = torch.zeros(3, 8, device=DEVICE)
    weight = torch.ones(8, device=DEVICE)
    bad: list[Callable[[], object]] = [
        lambda: rms_norm(x, torch.ones(7, device=DEVICE), EPS),
        lambda: rms_norm(x, torch.ones(1, 8, device=DEVICE), EPS),
        lambda: rms_norm(torch.zeros((), device=DEVICE), weight, EPS),
        lambda: rms_norm(x.long(), weight, EPS),
        lambda: rms_norm(x, weight, EPS, residual=torch.zeros(3, 9, device=DEVICE)),
        lambda: rms_norm(x, weight, EPS, residual=x.half()),
    ]
    for call in bad:
        with pytest.raises(ValueError):
            call()


# --- RoPE + KV-cache write ------------------------------------------------------------------

NUM_BLOCKS, BLOCK_SIZE = 5, 4


def _rope_inputs(
    gen: torch.Generator,
    tokens: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    cache_dtype: torch.dtype,
    pads: int,
) -> dict[str, torch.Tensor]:
    """qk and v as the model gets them (column slices of one ``[T, (H + 2 KVH) D]`` tensor),
    cos/sin from RotaryEmbedding at random positions, caches full of random values, each the
    view of a pool that keeps one extra row in front (where a slot of -1 would land), and
    shuffled slots with ``pads`` of them -1."""
    qkv = _randn(gen, tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, scale=2.0)
    qk_width = (heads + kv_heads) * head_dim
    positions = torch.randint(0, 4096, (tokens,), generator=gen).to(DEVICE)
    cos, sin = RotaryEmbedding(head_dim, 10000.0).to(DEVICE)(positions)
    num_slots = NUM_BLOCKS * BLOCK_SIZE
    k_pool = _randn(gen, num_slots + 1, kv_heads, head_dim, dtype=cache_dtype)
    v_pool = _randn(gen, num_slots + 1, kv_heads, head_dim, dtype=cache_dtype)
    slots = torch.randperm(num_slots, generator=gen)[:tokens]
    slots[torch.randperm(tokens, generator=gen)[:pads]] = -1
    return {
        "qk": qkv[:, :qk_width].view(tokens, heads + kv_heads, head_dim),
        "v": qkv[:, qk_width:].view(tokens, kv_heads, head_dim),
        "cos": cos,
        "sin": sin,
        "k_pool": k_pool,
        "v_pool": v_pool,
        "slot_mapping": slots.to(DEVICE),
    }


def _caches(pool: torch.Tensor) -> torch.Tensor:
    return pool[1:].view(NUM_BLOCKS, BLOCK_SIZE, *pool.shape[1:])


def _check_rope(case: dict[str, torch.Tensor], heads: int) -> None:
    """Run kernel and reference on copies of the caches; compare q, the written rows, and
    every other row of the pools (bit-identical to before)."""
    dtype, cache_dtype = case["qk"].dtype, case["k_pool"].dtype
    qkv_before = case["qk"].clone(), case["v"].clone()
    pools = {name: case[name].clone() for name in ("k_pool", "v_pool")}
    ref_pools = {name: case[name].clone() for name in ("k_pool", "v_pool")}
    args = (case["qk"], case["v"], case["cos"], case["sin"])
    slots = case["slot_mapping"]

    q = apply_rotary_and_write_kv(*args, _caches(pools["k_pool"]), _caches(pools["v_pool"]), slots, heads)
    q_ref = apply_rotary_and_write_kv_reference(
        *args, _caches(ref_pools["k_pool"]), _caches(ref_pools["v_pool"]), slots, heads
    )
    assert q.is_contiguous()
    assert_within_ulps(q, q_ref, _rounding_ulps(dtype))
    written = slots[slots >= 0] + 1  # pool rows: the pool keeps one row before the cache
    untouched = torch.ones(NUM_BLOCKS * BLOCK_SIZE + 1, dtype=torch.bool, device=DEVICE)
    untouched[written] = False
    for name in ("k_pool", "v_pool"):
        assert torch.equal(pools[name][untouched], case[name][untouched]), f"{name}: a row no token owns changed"
    assert torch.equal(pools["v_pool"][written], ref_pools["v_pool"][written])  # a plain copy
    # k rounds to the activations' dtype, then to the cache's: count ulps in the coarser one.
    coarse = max(dtype, cache_dtype, key=lambda d: torch.finfo(d).eps)
    assert_within_ulps(
        pools["k_pool"][written].to(coarse),
        ref_pools["k_pool"][written].to(coarse),
        _rounding_ulps(dtype) + _rounding_ulps(cache_dtype),
    )
    assert torch.equal(case["qk"], qkv_before[0]) and torch.equal(case["v"], qkv_before[1])


ROPE_SHAPES = [  # (heads, kv_heads, head_dim)
    (4, 2, 16),  # GQA 2
    (3, 3, 24),  # MHA; 12 pairs per head, masked in a block of 16
    (9, 3, 64),  # SmolLM2-135M
    (12, 4, 256),  # 8 heads per program: q|k and k|v boundaries inside programs, last one ragged
]
ROPE_DTYPES = [(f32, f32), (bf16, bf16), (f16, f16), (bf16, f32), (f32, f16)]  # (activations, cache)


@pytest.mark.parametrize("dtype,cache_dtype", ROPE_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("heads,kv_heads,head_dim", ROPE_SHAPES)
def test_rotary_and_write_kv_matches_reference(
    heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, cache_dtype: torch.dtype
) -> None:
    gen = _generator("rope", heads, kv_heads, head_dim, dtype, cache_dtype)
    _check_rope(_rope_inputs(gen, 6, heads, kv_heads, head_dim, dtype, cache_dtype, pads=2), heads)


def test_rotary_all_padding_writes_nothing() -> None:
    case = _rope_inputs(_generator("rope-pad"), 3, 4, 2, 16, bf16, bf16, pads=3)
    _check_rope(case, 4)


def test_rotary_contiguous_inputs_and_int32_slots() -> None:
    """Separate contiguous q/k and v tensors, an int32 slot mapping taken with a stride."""
    case = _rope_inputs(_generator("rope-int32"), 5, 6, 2, 32, f32, f32, pads=1)
    case["qk"], case["v"] = case["qk"].contiguous(), case["v"].contiguous()
    case["slot_mapping"] = torch.stack([case["slot_mapping"], case["slot_mapping"]], dim=1).int()[:, 0]
    _check_rope(case, 6)


def test_rotary_is_apply_rotary_bit_for_bit_in_fp32() -> None:
    """The docstring's claim at a realistic angle spread (positions up to 4096)."""
    case = _rope_inputs(_generator("rope-exact"), 4, 8, 1, 128, f32, f32, pads=0)
    k_cache, v_cache = _caches(case["k_pool"].clone()), _caches(case["v_pool"].clone())
    q = apply_rotary_and_write_kv(case["qk"], case["v"], case["cos"], case["sin"], k_cache, v_cache,
                                  case["slot_mapping"], 8)
    ref_k, ref_v = _caches(case["k_pool"].clone()), _caches(case["v_pool"].clone())
    q_ref = apply_rotary_and_write_kv_reference(case["qk"], case["v"], case["cos"], case["sin"], ref_k, ref_v,
                                                case["slot_mapping"], 8)
    assert torch.equal(q, q_ref) and torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)


def test_rotary_rejects_bad_inputs() -> None:
    case = _rope_inputs(_generator("rope-bad"), 3, 4, 2, 16, f32, f32, pads=0)
    base = {
        "qk": case["qk"], "v": case["v"], "cos": case["cos"], "sin": case["sin"],
        "k_cache": _caches(case["k_pool"]), "v_cache": _caches(case["v_pool"]),
        "slot_mapping": case["slot_mapping"], "num_heads": 4,
    }
    odd = torch.zeros(3, 6, 15, device=DEVICE)
    changes: list[dict[str, object]] = [
        {"num_heads": 6},  # no k head left
        {"num_heads": 0},
        {"qk": case["qk"][0]},  # 2-D
        {"v": case["v"][:, :1]},  # one kv head where qk has two
        {"v": case["v"].half()},
        {"qk": odd, "v": torch.zeros(3, 2, 15, device=DEVICE)},  # odd head_dim
        {"cos": case["cos"][:, :, :4]},
        {"sin": case["sin"][:2]},
        {"k_cache": _caches(case["k_pool"])[..., :8]},
        {"v_cache": torch.zeros(NUM_BLOCKS, BLOCK_SIZE, 1, 16, device=DEVICE)},
        {"slot_mapping": case["slot_mapping"][:2]},
        {"slot_mapping": case["slot_mapping"].float()},
    ]
    for change in changes:
        with pytest.raises(ValueError):
            apply_rotary_and_write_kv(**{**base, **change})  # type: ignore[arg-type]


# --- SiLU-and-mul ---------------------------------------------------------------------------


@pytest.mark.parametrize("inter", [72, 576, 1536])  # 1536: two column blocks, the second ragged
@pytest.mark.parametrize("dtype", [f32, bf16, f16])
def test_silu_and_mul_matches_reference(dtype: torch.dtype, inter: int) -> None:
    gate_up = _randn(_generator("silu", dtype, inter), 4, 2 * inter, dtype=dtype, scale=3.0)
    before = gate_up.clone()
    out = silu_and_mul(gate_up)
    assert_within_ulps(out, silu_and_mul_reference(gate_up), SILU_ULPS[dtype])
    assert torch.equal(gate_up, before)


def test_silu_and_mul_strided_batched_input() -> None:
    gen = _generator("silu-strided")
    wide = _randn(gen, 2, 3, 2 * 40 + 5, dtype=f16, scale=3.0)
    gate_up = wide[..., 1 : 1 + 2 * 40]
    out = silu_and_mul(gate_up)
    assert out.shape == (2, 3, 40)
    assert_within_ulps(out, silu_and_mul_reference(gate_up), SILU_ULPS[f16])


def test_silu_and_mul_rejects_bad_inputs() -> None:
    for bad in (torch.zeros(3, 7), torch.zeros(3, 0), torch.zeros(()), torch.zeros(3, 8, dtype=torch.int32)):
        with pytest.raises(ValueError):
            silu_and_mul(bad.to(DEVICE))


def test_empty_batches() -> None:
    """T = 0 (no launch): shaped empty results, the caches untouched."""
    weight = torch.ones(8, device=DEVICE)
    assert rms_norm(torch.zeros(0, 8, device=DEVICE), weight, EPS).shape == (0, 8)
    assert silu_and_mul(torch.zeros(0, 8, device=DEVICE)).shape == (0, 4)
    case = _rope_inputs(_generator("rope-empty"), 0, 4, 2, 16, f32, f32, pads=0)
    k_cache = _caches(case["k_pool"])
    before = k_cache.clone()
    q = apply_rotary_and_write_kv(case["qk"], case["v"], case["cos"], case["sin"], k_cache,
                                  _caches(case["v_pool"]), case["slot_mapping"], 4)
    assert q.shape == (0, 4, 16) and torch.equal(k_cache, before)


# --- realistic shapes on a GPU --------------------------------------------------------------


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("hidden", [576, 4096, 8192])
@pytest.mark.parametrize("dtype", [bf16, f16, f32])
def test_gpu_rms_norm_realistic(dtype: torch.dtype, hidden: int) -> None:
    gen = _generator("gpu-norm", dtype, hidden)
    x = _randn(gen, 4096, hidden, dtype=dtype)
    residual = _randn(gen, 4096, hidden, dtype=dtype, scale=4.0)
    weight = _randn(gen, hidden, dtype=dtype)
    out, total = rms_norm(x, weight, EPS, residual=residual)
    expected_out, expected_total = rms_norm_reference(x, weight, EPS, residual=residual)
    assert torch.equal(total, expected_total)
    assert_within_ulps(out, expected_out, NORM_ULPS[dtype])
    assert_within_ulps(rms_norm(x, weight, EPS), rms_norm_reference(x, weight, EPS), NORM_ULPS[dtype])


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (32, 8, 128), (64, 8, 128)])
@pytest.mark.parametrize("dtype,cache_dtype", [(bf16, bf16), (f16, f16), (bf16, f32)])
def test_gpu_rotary_and_write_kv_realistic(
    heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, cache_dtype: torch.dtype
) -> None:
    """2048 tokens into a 4096-slot cache, 64 of them padding: exact (RoPE rounds as torch)."""
    gen = _generator("gpu-rope", heads, kv_heads, head_dim, dtype, cache_dtype)
    num_blocks, block_size, tokens = 256, 16, 2048
    qkv = _randn(gen, tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, scale=2.0)
    qk = qkv[:, : (heads + kv_heads) * head_dim].view(tokens, heads + kv_heads, head_dim)
    v = qkv[:, (heads + kv_heads) * head_dim :].view(tokens, kv_heads, head_dim)
    positions = torch.randint(0, 131072, (tokens,), generator=gen).to(DEVICE)
    cos, sin = RotaryEmbedding(head_dim, 500000.0).to(DEVICE)(positions)
    k_cache = _randn(gen, num_blocks, block_size, kv_heads, head_dim, dtype=cache_dtype)
    v_cache = _randn(gen, num_blocks, block_size, kv_heads, head_dim, dtype=cache_dtype)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    slots[torch.randperm(tokens, generator=gen)[:64]] = -1
    slots = slots.to(DEVICE)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    q = apply_rotary_and_write_kv(qk, v, cos, sin, k_cache, v_cache, slots, heads)
    q_ref = apply_rotary_and_write_kv_reference(qk, v, cos, sin, ref_k, ref_v, slots, heads)
    assert torch.equal(q, q_ref)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("inter", [1536, 14336])
@pytest.mark.parametrize("dtype", [bf16, f16, f32])
def test_gpu_silu_and_mul_realistic(dtype: torch.dtype, inter: int) -> None:
    gate_up = _randn(_generator("gpu-silu", dtype, inter), 2048, 2 * inter, dtype=dtype, scale=3.0)
    assert_within_ulps(silu_and_mul(gate_up), silu_and_mul_reference(gate_up), SILU_ULPS[dtype])


@pytest.mark.gpu
@needs_gpu
def test_gpu_rotary_replays_in_a_cuda_graph() -> None:
    """Captured once (the wrappers never synchronise the host), replayed after the inputs
    and the slots, -1 padding included, change in place."""
    gen = _generator("gpu-graph")
    heads, kv_heads, head_dim, tokens = 32, 8, 128, 64
    qk = _randn(gen, tokens, heads + kv_heads, head_dim, dtype=bf16)
    v = _randn(gen, tokens, kv_heads, head_dim, dtype=bf16)
    cos, sin = RotaryEmbedding(head_dim, 10000.0).to(DEVICE)(torch.arange(tokens, device=DEVICE))
    k_cache = torch.zeros(64, 16, kv_heads, head_dim, dtype=bf16, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.arange(tokens, device=DEVICE)
    apply_rotary_and_write_kv(qk, v, cos, sin, k_cache, v_cache, slots, heads)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q = apply_rotary_and_write_kv(qk, v, cos, sin, k_cache, v_cache, slots, heads)

    new_cos, new_sin = RotaryEmbedding(head_dim, 10000.0).to(DEVICE)(torch.arange(500, 500 + tokens, device=DEVICE))
    new_slots = torch.randperm(64 * 16, generator=gen)[:tokens]
    new_slots[-8:] = -1
    qk.copy_(_randn(gen, tokens, heads + kv_heads, head_dim, dtype=bf16))
    v.copy_(_randn(gen, tokens, kv_heads, head_dim, dtype=bf16))
    cos.copy_(new_cos)
    sin.copy_(new_sin)
    slots.copy_(new_slots.to(DEVICE))
    k_cache.zero_()
    v_cache.zero_()
    graph.replay()
    ref_k, ref_v = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    q_ref = apply_rotary_and_write_kv_reference(qk, v, cos, sin, ref_k, ref_v, slots, heads)
    torch.cuda.synchronize()
    assert torch.equal(q, q_ref) and torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)
