"""The torch dequantizers against gguf-py's numpy ones, bit for bit.

``gguf.quants.dequantize`` is the reference. Random blocks exercise every bit of every
field; the fp16 scale fields are overwritten with finite halves (any finite bit pattern,
subnormals and -0.0 included) so that no NaN reaches the comparison.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf_blocks import F16_FIELDS

from rocmforge.errors import GGUFFormatError, GGUFUnsupportedError
from rocmforge.gguf import dequant
from rocmforge.gguf.dequant import SUPPORTED_TYPES, dequantize, row_bytes

# Plain float types: word, exponent mask, and an exponent bit that, cleared, makes an
# all-ones exponent (inf/NaN) finite.
_FLOAT_FORMATS: dict[T, tuple[type[np.unsignedinteger], int, int]] = {
    T.F32: (np.uint32, 0x7F800000, 1 << 30),
    T.F16: (np.uint16, 0x7C00, 1 << 14),
    T.BF16: (np.uint16, 0x7F80, 1 << 14),
}

ALL_TYPES = sorted(SUPPORTED_TYPES, key=lambda qtype: qtype.value)

# Worst round-trip error of gguf's own quantizers, as a fraction of the largest |x| in
# each group of 32 (symmetric: one step d = absmax / 2^(bits-1); asymmetric: range/levels).
_ROUND_TRIP_TOLERANCE: dict[T, float] = {
    T.F32: 0.0,
    T.F16: 2.0**-11,
    T.BF16: 2.0**-8,
    T.Q8_0: 1 / 127,
    T.Q4_0: 1 / 8,
    T.Q5_0: 1 / 16,
    T.Q4_1: 2 / 15,
    T.Q5_1: 2 / 31,
}


def _finite_words(rng: np.random.Generator, fmt: T, n: int) -> np.ndarray:
    """``n`` random bit patterns of float format ``fmt`` (any finite value, no inf/NaN)."""
    word, exponent, clear = _FLOAT_FORMATS[fmt]
    bits = rng.integers(0, np.iinfo(word).max, n, dtype=word, endpoint=True)
    bits[(bits & exponent) == exponent] &= word(~clear & np.iinfo(word).max)
    return bits


def _random_tensor_bytes(qtype: T, n_blocks: int, seed: int = 0) -> np.ndarray:
    """Random bytes for ``n_blocks`` blocks of ``qtype``, with every float field finite."""
    rng = np.random.default_rng(seed)
    if qtype in _FLOAT_FORMATS:
        return _finite_words(rng, qtype, n_blocks).view(np.uint8)
    blocks = rng.integers(0, 256, (n_blocks, GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8)
    for offset in F16_FIELDS[qtype]:
        halves = _finite_words(rng, T.F16, n_blocks)
        blocks[:, offset : offset + 2] = halves.view(np.uint8).reshape(n_blocks, 2)
    return blocks.reshape(-1)


def _reference(raw: np.ndarray, qtype: T, shape: tuple[int, ...]) -> torch.Tensor:
    """gguf-py's float32 dequantization of ``raw``, reshaped to ``shape``."""
    values = gguf.quants.dequantize(raw, qtype).astype(np.float32, copy=False)
    return torch.from_numpy(np.ascontiguousarray(values)).reshape(shape)


def _assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype
    int_type = {4: torch.int32, 2: torch.int16}[actual.element_size()]
    mismatched = (actual.view(int_type) != expected.view(int_type)).sum().item()
    assert mismatched == 0, f"{mismatched} of {actual.numel()} values differ in their bits"


def _n_blocks(qtype: T, n_elements: int) -> int:
    return n_elements // GGML_QUANT_SIZES[qtype][0]


def test_supported_types() -> None:
    assert SUPPORTED_TYPES == {
        T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1,
        T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K,
    }  # fmt: skip


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda qtype: qtype.name)
def test_random_blocks_match_reference(qtype: T) -> None:
    n_elements = 64 * 256
    raw = _random_tensor_bytes(qtype, _n_blocks(qtype, n_elements), seed=qtype.value)
    out = dequantize(torch.from_numpy(raw), qtype, (n_elements,))
    _assert_bits_equal(out, _reference(raw, qtype, (n_elements,)))


@pytest.mark.parametrize("qtype", list(_ROUND_TRIP_TOLERANCE), ids=lambda qtype: qtype.name)
def test_quantize_round_trip(qtype: T) -> None:
    rng = np.random.default_rng(qtype.value)
    values = (rng.standard_normal((8, 256)) * rng.uniform(0.01, 10, (8, 1))).astype(np.float32)
    raw = np.ascontiguousarray(gguf.quants.quantize(values, qtype)).reshape(-1).view(np.uint8)

    out = dequantize(torch.from_numpy(raw), qtype, values.shape)

    _assert_bits_equal(out, _reference(raw, qtype, values.shape))
    groups = values.reshape(-1, 32)
    error = np.abs(out.numpy().reshape(-1, 32) - groups)
    allowed = _ROUND_TRIP_TOLERANCE[qtype] * np.abs(groups).max(axis=1, keepdims=True)
    assert (error <= allowed * 1.01).all()


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda qtype: qtype.name)
@pytest.mark.parametrize("rows", [(), (5,), (2, 3)], ids=["1d", "2d", "3d"])
def test_shapes(qtype: T, rows: tuple[int, ...]) -> None:
    block_size, _ = GGML_QUANT_SIZES[qtype]
    shape = (*rows, 2 * max(block_size, 32))
    n_elements = int(np.prod(shape))
    raw = _random_tensor_bytes(qtype, _n_blocks(qtype, n_elements), seed=len(rows))

    out = dequantize(torch.from_numpy(raw), qtype, shape)

    _assert_bits_equal(out, _reference(raw, qtype, shape))


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda qtype: qtype.name)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_output_is_the_rounded_float32(qtype: T, dtype: torch.dtype) -> None:
    shape = (4, 512)
    raw = torch.from_numpy(_random_tensor_bytes(qtype, _n_blocks(qtype, 4 * 512), seed=7))

    out = dequantize(raw, qtype, shape, dtype=dtype)

    _assert_bits_equal(out, dequantize(raw, qtype, shape).to(dtype))


def test_chunk_boundaries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoding in several chunks, the last one short, gives the one-shot result."""
    monkeypatch.setattr(dequant, "_CHUNK_ELEMENTS", 3 * 256)
    raw = _random_tensor_bytes(T.Q4_K, 10, seed=3)

    out = dequantize(torch.from_numpy(raw), T.Q4_K, (10, 256))

    _assert_bits_equal(out, _reference(raw, T.Q4_K, (10, 256)))


def test_input_forms() -> None:
    """Typed arrays are read as their bytes; misaligned input works; the output is a copy."""
    halves = np.random.default_rng(1).standard_normal(64).astype(np.float16)
    out = dequantize(torch.from_numpy(halves.reshape(4, 16)), T.F16, (4, 16))
    _assert_bits_equal(out, torch.from_numpy(halves.astype(np.float32)).reshape(4, 16))

    raw = _random_tensor_bytes(T.F32, 32)
    misaligned = torch.from_numpy(np.concatenate([np.zeros(1, np.uint8), raw]))[1:]
    out = dequantize(misaligned, T.F32, (32,))
    expected = _reference(raw, T.F32, (32,))
    _assert_bits_equal(out, expected)
    misaligned.zero_()
    _assert_bits_equal(out, expected)


def test_unsupported_type() -> None:
    raw = torch.zeros(GGML_QUANT_SIZES[T.IQ2_XXS][1], dtype=torch.uint8)
    with pytest.raises(GGUFUnsupportedError, match="IQ2_XXS"):
        dequantize(raw, T.IQ2_XXS, (256,))
    with pytest.raises(GGUFUnsupportedError):
        dequantize(raw, 9999, (256,))  # type: ignore[arg-type]
    with pytest.raises(GGUFUnsupportedError):
        dequantize(torch.zeros(34, dtype=torch.uint8), T.Q8_0, (32,), dtype=torch.int32)


@pytest.mark.parametrize("n_bytes", [33, 35, 0, 68])
def test_wrong_byte_count(n_bytes: int) -> None:
    with pytest.raises(GGUFFormatError) as info:
        dequantize(torch.zeros(n_bytes, dtype=torch.uint8), T.Q8_0, (1, 32))
    assert info.value.field == "tensor data"
    assert info.value.offset == 0
    assert info.value.is_user_error()


def test_row_not_whole_blocks() -> None:
    with pytest.raises(GGUFFormatError):
        dequantize(torch.zeros(34, dtype=torch.uint8), T.Q8_0, (2, 16))


@pytest.mark.parametrize(
    ("qtype", "n_cols", "expected"),
    [
        (T.F32, 576, 2304),
        (T.F16, 576, 1152),
        (T.BF16, 7, 14),
        (T.Q8_0, 576, 612),
        (T.Q4_1, 576, 360),
        (T.Q4_K, 512, 288),
        (T.Q6_K, 256, 210),
        (T.IQ2_XXS, 256, 66),
    ],
)
def test_row_bytes(qtype: T, n_cols: int, expected: int) -> None:
    assert row_bytes(qtype, n_cols) == expected


def test_row_bytes_rejects_partial_blocks() -> None:
    with pytest.raises(GGUFFormatError):
        row_bytes(T.Q4_K, 300)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA/ROCm device")
@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda qtype: qtype.name)
def test_device_matches_reference(qtype: T) -> None:
    shape = (16, 1024)
    raw = _random_tensor_bytes(qtype, _n_blocks(qtype, 16 * 1024), seed=11)

    out = dequantize(torch.from_numpy(raw).cuda(), qtype, shape)

    assert out.is_cuda
    _assert_bits_equal(out.cpu(), _reference(raw, qtype, shape))


# --- the real default model ----------------------------------------------------------------


@pytest.fixture(scope="module")
def default_tensors(default_gguf: Path) -> dict[str, gguf.ReaderTensor]:
    reader = gguf.GGUFReader(default_gguf)
    return {tensor.name: tensor for tensor in reader.tensors}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "qtype"),
    [("blk.0.attn_q.weight", T.Q4_1), ("token_embd.weight", T.Q8_0)],
    ids=["attn_q-Q4_1", "token_embd-Q8_0"],
)
def test_default_model_tensor(
    default_tensors: dict[str, gguf.ReaderTensor], name: str, qtype: T
) -> None:
    tensor = default_tensors[name]
    assert tensor.tensor_type == qtype
    raw = np.array(tensor.data, dtype=np.uint8).reshape(-1)  # a writable copy of the memmap
    shape = tuple(int(dim) for dim in reversed(tensor.shape))  # GGUF lists ne0 (the row) first

    out = dequantize(torch.from_numpy(raw), qtype, shape)

    _assert_bits_equal(out, _reference(raw, qtype, shape))
