"""Big random-weight GGUF files of real-model sizes, for benchmarks.

In: a :class:`~rocmforge.synthetic.spec.SyntheticSpec` (for real-model sizes
:data:`~rocmforge.synthetic.spec.LLAMA_3_2_1B` or
:data:`~rocmforge.synthetic.spec.LLAMA_3_1_8B`), a seed and a tensor type (one of
:data:`RANDOM_TYPES`) or a chooser such as :func:`q4_k_m_types` (llama.cpp's Q4_K_M type
mix). Out: a GGUF file with the same
layout and metadata as :func:`~rocmforge.synthetic.hf_weights.write_gguf` writes
(:func:`write_random_gguf`), without any fp32 master weights: each tensor is generated
straight in its stored encoding (random code bytes with fp16 scale fields set for the
intended spread, or scaled random normals for float types), on all CPU cores, and written
before the next one is made, so memory stays at about one tensor. The writer owns its
thread pool and the one tensor in flight.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, quants

from rocmforge.synthetic.spec import (
    SyntheticSpec,
    TensorTypeChooser,
    _tensor_shapes,
    _write_metadata,
    llama3_rope_factors,
)


@dataclass(frozen=True, slots=True)
class _BlockScales:
    """The fp16 fields :func:`write_random_gguf` sets in a block of random bytes: the scale
    ``d`` at byte ``d_at`` and, for types with an offset, the field at ``offset_at`` (``m``
    or ``dmin``) set to ``offset_ratio * d``, which centres the decoded values of uniformly
    random codes, scales and mins on zero (see the block layouts in
    :mod:`rocmforge.gguf.dequant`)."""

    d_at: int
    offset_at: int | None = None
    offset_ratio: float = 0.0


_RANDOM_BLOCKS: dict[GGMLQuantizationType, _BlockScales] = {
    GGMLQuantizationType.Q8_0: _BlockScales(0),
    GGMLQuantizationType.Q4_0: _BlockScales(0),
    GGMLQuantizationType.Q5_0: _BlockScales(0),
    GGMLQuantizationType.Q4_1: _BlockScales(0, 2, -7.5),  # x = d q + m, mean q 7.5
    GGMLQuantizationType.Q5_1: _BlockScales(0, 2, -15.5),  # mean q 15.5
    GGMLQuantizationType.Q2_K: _BlockScales(80, 82, 1.5),  # x = d s q - dmin m: mean s = m = 7.5, q 1.5
    GGMLQuantizationType.Q3_K: _BlockScales(108),
    GGMLQuantizationType.Q4_K: _BlockScales(0, 2, 7.5),  # mean s = m = 31.5, q 7.5
    GGMLQuantizationType.Q5_K: _BlockScales(0, 2, 15.5),  # mean q 15.5
    GGMLQuantizationType.Q6_K: _BlockScales(208),
}
# Float types and the numpy dtype their elements are written as (BF16 as its bit pattern).
_FLOAT_TYPES: dict[GGMLQuantizationType, type[np.generic]] = {
    GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.BF16: np.uint16,
}
RANDOM_TYPES: frozenset[GGMLQuantizationType] = frozenset(_FLOAT_TYPES) | frozenset(_RANDOM_BLOCKS)
"""The tensor types :func:`write_random_gguf` generates."""
# llama.cpp's fallback for a K-quant whose rows are not whole 256-element super-blocks.
_K_QUANT_FALLBACK = {
    GGMLQuantizationType.Q4_K: GGMLQuantizationType.Q5_0,
    GGMLQuantizationType.Q6_K: GGMLQuantizationType.Q8_0,
}
# Elements one task of :func:`_random_matrix` generates (16 MiB of float32 temporaries).
_CHUNK_ELEMENTS = 1 << 22


def q4_k_m_types(spec: SyntheticSpec) -> TensorTypeChooser:
    """llama.cpp's Q4_K_M type mix for ``spec`` (``llama_tensor_get_type`` in
    ``src/llama-quant.cpp``, llama architecture, no importance matrix).

    * ``output.weight``, and ``token_embd.weight`` when the output head is tied to it: Q6_K;
    * ``attn_v`` and ``ffn_down`` of the layers ``use_more_bits`` picks (the first eighth, the
      last eighth and every third layer in between): Q6_K;
    * every other matrix, the untied ``token_embd.weight`` included: Q4_K.

    A row that is not a whole number of 256-element super-blocks falls back as llama.cpp
    does: Q6_K -> Q8_0, Q4_K -> Q5_0 (the vectors are F32 whatever the chooser says).
    """
    n = spec.num_layers

    def use_more_bits(layer: int) -> bool:
        return layer < n // 8 or layer >= 7 * n // 8 or (layer - n // 8) % 3 == 2

    def choose(name: str) -> GGMLQuantizationType:
        head = name == "output.weight" or (spec.tie_embeddings and name == "token_embd.weight")
        parts = name.split(".", 2)
        suffix = parts[2] if parts[0] == "blk" else name
        more_bits = suffix in ("attn_v.weight", "ffn_down.weight") and use_more_bits(int(parts[1]))
        qtype = GGMLQuantizationType.Q6_K if head or more_bits else GGMLQuantizationType.Q4_K
        in_features = spec.intermediate_size if suffix == "ffn_down.weight" else spec.hidden_size
        if in_features % GGML_QUANT_SIZES[qtype][0]:
            return _K_QUANT_FALLBACK[qtype]
        return qtype

    return choose


def write_random_gguf(
    path: Path,
    spec: SyntheticSpec,
    tensor_type: GGMLQuantizationType | TensorTypeChooser,
    seed: int = 0,
) -> None:
    """Write a GGUF file of ``spec``'s shape with random weights, fast and in bounded memory.

    Same layout and metadata as :func:`write_gguf`, but no HF weights come in or go out:
    ``tensor_type`` is one of :data:`RANDOM_TYPES` for every matrix, or a chooser such as
    :func:`q4_k_m_types`; vectors (norms near 1, biases, llama-3 RoPE factors) are F32. A
    matrix with ``n`` input features decodes to values of root-mean-square about
    ``1/sqrt(n)``, centred on zero and finite. Each matrix is generated in its stored
    encoding in chunks on all CPU cores (the bytes depend only on ``seed``, not on the
    number of cores) and written before the next is made, so at most one tensor is in
    memory: an 8B-shaped f16 file (15 GB) took 2 minutes and 0.5 GB on 2 cores, its
    Q4_K_M (4.5 GB) 12 s; random normals are the cost, random blocks are nearly free.

    Raises ``ValueError`` for a type not in :data:`RANDOM_TYPES`, or a matrix whose rows are
    not whole blocks of its type (K-quants need a multiple of 256 input features).
    """
    if isinstance(tensor_type, GGMLQuantizationType):
        choose: TensorTypeChooser = functools.partial(_same_type, tensor_type)
    else:
        choose = tensor_type
    plan: list[tuple[str, tuple[int, ...], GGMLQuantizationType]] = []
    for name, shape in _tensor_shapes(spec):
        qtype = choose(name) if len(shape) == 2 else GGMLQuantizationType.F32
        if qtype not in RANDOM_TYPES:
            raise ValueError(
                f"{name}: cannot write random {qtype.name} tensors (have: {', '.join(t.name for t in RANDOM_TYPES)})"
            )
        block = GGML_QUANT_SIZES[qtype][0]
        if shape[-1] % block:
            raise ValueError(f"{name}: rows of {shape[-1]} elements are not whole {qtype.name} blocks of {block}")
        plan.append((name, shape, qtype))
    llama3_rope = spec.rope_scaling is not None and spec.rope_scaling["rope_type"] == "llama3"
    rope_factors = llama3_rope_factors(spec) if llama3_rope else None

    writer = GGUFWriter(str(path), spec.arch)
    _write_metadata(writer, spec)
    for name, shape, qtype in plan:
        stored_shape, dtype = _stored_layout(shape, qtype)
        nbytes = int(np.prod(stored_shape)) * np.dtype(dtype).itemsize
        writer.add_tensor_info(name, stored_shape, np.dtype(dtype), nbytes, raw_dtype=qtype)
    if rope_factors is not None:
        writer.add_tensor_info("rope_freqs.weight", rope_factors.shape, rope_factors.dtype, rope_factors.nbytes)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        for index, (name, shape, qtype) in enumerate(plan):
            if len(shape) == 1:
                writer.write_tensor_data(_random_vector(_rng(seed, index), shape[0], name.endswith("norm.weight")))
            else:
                writer.write_tensor_data(_random_matrix(pool, (seed, index), shape[0], shape[1], qtype))
    if rope_factors is not None:
        writer.write_tensor_data(rope_factors)
    writer.close()


def _same_type(qtype: GGMLQuantizationType, name: str) -> GGMLQuantizationType:
    return qtype


def _stored_layout(shape: tuple[int, ...], qtype: GGMLQuantizationType) -> tuple[tuple[int, ...], type[np.generic]]:
    """Shape and dtype of the array that holds a ``shape`` tensor of ``qtype``: elements for
    float types, ``uint8`` bytes (rows x row bytes) for block types."""
    if qtype in _FLOAT_TYPES:
        return shape, _FLOAT_TYPES[qtype]
    block, type_size = GGML_QUANT_SIZES[qtype]
    return (*shape[:-1], shape[-1] // block * type_size), np.uint8


def _rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.SFC64(np.random.SeedSequence(key)))


def _random_vector(rng: np.random.Generator, size: int, norm: bool) -> np.ndarray:
    """A norm weight (near 1) or a bias (near 0), float32."""
    noise = (0.1 * rng.standard_normal(size)).astype(np.float32)
    return noise + np.float32(1.0) if norm else noise


def _random_matrix(
    pool: ThreadPoolExecutor, key: tuple[int, int], rows: int, cols: int, qtype: GGMLQuantizationType
) -> np.ndarray:
    """A ``rows x cols`` matrix of ``qtype`` in its stored layout, values of RMS ``1/sqrt(cols)``.

    Filled in chunks of whole rows on ``pool``'s threads (numpy's generators and casts
    release the GIL); the chunk starting at row ``r`` draws from a generator seeded with
    ``(*key, r)``.
    """
    shape, dtype = _stored_layout((rows, cols), qtype)
    out = np.empty(shape, dtype=dtype)
    step = max(1, _CHUNK_ELEMENTS // cols)
    floats = qtype in _FLOAT_TYPES
    scale = 1.0 / np.sqrt(cols) / (1.0 if floats else _unit_rms(qtype))

    def fill(start: int) -> None:
        rng, dest = _rng(*key, start), out[start : start + step]
        if floats:
            _fill_floats(rng, dest, qtype, scale)
        else:
            _fill_blocks(rng, dest, qtype, scale)

    list(pool.map(fill, range(0, rows, step)))
    return out


def _fill_floats(rng: np.random.Generator, dest: np.ndarray, qtype: GGMLQuantizationType, std: float) -> None:
    """Normals of standard deviation ``std`` into ``dest`` (elements of ``qtype``)."""
    values = rng.standard_normal(dest.shape, dtype=np.float32)
    values *= np.float32(std)
    if qtype == GGMLQuantizationType.BF16:
        dest[...] = values.view(np.uint32) >> 16  # bf16 = the top half of the float32, truncated
    else:
        dest[...] = values


def _fill_blocks(rng: np.random.Generator, dest: np.ndarray, qtype: GGMLQuantizationType, scale: float) -> None:
    """Blocks of ``qtype`` into ``dest`` (rows x row bytes): random bytes for every code,
    sub-block scale and min; the fp16 block scale ``d`` is ``scale`` times a uniform factor in
    [0.5, 1.5) per block, and the offset field follows ``d``."""
    type_size = GGML_QUANT_SIZES[qtype][1]
    dest.reshape(-1)[:] = rng.bit_generator.random_raw(-(-dest.size // 8)).view(np.uint8)[: dest.size]
    blocks = dest.reshape(dest.shape[0], -1, type_size)
    fields = _RANDOM_BLOCKS[qtype]
    d = (rng.uniform(0.5, 1.5, size=blocks.shape[:2]) * scale).astype(np.float16)
    _set_f16(blocks, fields.d_at, d)
    if fields.offset_at is not None:
        _set_f16(blocks, fields.offset_at, (d.astype(np.float32) * np.float32(fields.offset_ratio)).astype(np.float16))


@functools.cache
def _unit_rms(qtype: GGMLQuantizationType) -> float:
    """Root-mean-square of the values :func:`_fill_blocks` makes with ``scale`` 1, measured
    once per type by decoding a sample with gguf-py's reference dequantizer."""
    shape, _ = _stored_layout((64, 4096), qtype)
    sample = np.empty(shape, dtype=np.uint8)
    _fill_blocks(_rng(0), sample, qtype, 1.0)
    return float(np.sqrt(np.mean(np.square(quants.dequantize(sample, qtype), dtype=np.float64))))


def _set_f16(raw: np.ndarray, offset: int, values: np.ndarray) -> None:
    """Write ``values`` (fp16, one per block) into the 2-byte field at ``offset`` of every block."""
    raw[:, :, offset : offset + 2] = values.view(np.uint8).reshape(*values.shape, 2)
