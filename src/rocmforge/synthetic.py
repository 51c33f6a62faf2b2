"""Random-weight GGUF files of llama-family models, for tests and benchmarks.

In: a :class:`SyntheticSpec` (architecture and sizes), a seed and a tensor-type choice.
Out: a GGUF file laid out exactly as llama.cpp's converter writes one (Q/K rows permuted for
llama/mistral, fused nothing, tied or separate output head, a real byte-level BPE vocabulary
trained with ``tokenizers`` on a small corpus, a ChatML chat template) and the HF-layout fp32
weights the file holds after quantization, so a test can load the same numbers into HF
transformers.

For real-model sizes (benchmarks), :func:`write_random_gguf` writes the same layout from a
spec alone (:data:`LLAMA_3_2_1B`, :data:`LLAMA_3_1_8B`) without any fp32 master weights:
each tensor is generated straight in its stored encoding (random code bytes with fp16 scale
fields set for the intended spread, or scaled random normals for float types), on all CPU
cores, and written before the next one is made, so memory stays at about one tensor.
:func:`q4_k_m_types` gives llama.cpp's Q4_K_M type mix for it.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, quants
from gguf import constants as gguf_constants
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_CORPUS = (
    "The quick brown fox jumps over the lazy dog. Once upon a time, in a small village, there lived "
    "a curious cat. It was the best of times, it was the worst of times. def add(a, b):\n    return a + b\n"
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10. The capital of France is Paris. Hello, world! Caf\u00e9 na\u00efve "
    "Z\u00fcrich \u6771\u4eac \u041f\u0440\u0438\u0432\u0435\u0442 \U0001f600"
)
# Byte offsets of the fp16 super-block scale fields of the K-quants (ggml-common.h).
_KQUANT_F16_FIELDS = {
    GGMLQuantizationType.Q2_K: (80, 82),
    GGMLQuantizationType.Q3_K: (108,),
    GGMLQuantizationType.Q4_K: (0, 2),
    GGMLQuantizationType.Q5_K: (0, 2),
    GGMLQuantizationType.Q6_K: (208,),
}


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


@dataclass(frozen=True, slots=True)
class SyntheticSpec:
    arch: str = "llama"
    vocab_size: int = 320
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    max_context: int = 512
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = True
    qkv_bias: bool = False
    rope_scaling: dict | None = None
    """HF ``rope_scaling``: ``{"rope_type": "linear", "factor": f}`` or llama-3 style
    ``{"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings"}``."""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def hf_config(self) -> dict:
        """Keyword arguments for the matching ``transformers`` config class."""
        return dict(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            max_position_embeddings=self.max_context,
            rope_theta=self.rope_theta,
            rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=self.tie_embeddings,
            rope_scaling=self.rope_scaling,
        )


TensorTypeChooser = Callable[[str], GGMLQuantizationType]
"""Maps a GGUF tensor name to the type it is stored as."""


def all_f32(name: str) -> GGMLQuantizationType:
    return GGMLQuantizationType.F32


LLAMA_3_2_1B = SyntheticSpec(
    vocab_size=49152,
    hidden_size=2048,
    intermediate_size=8192,
    num_layers=16,
    num_heads=32,
    num_kv_heads=8,
    max_context=131072,
    rope_theta=500000.0,
    tie_embeddings=True,
    rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
)
"""Llama-3.2-1B's shape (head_dim 64, tied embeddings) with SmolLM2's 49,152-token vocabulary
instead of Llama 3's 128,256: 1.07 B parameters."""

LLAMA_3_1_8B = SyntheticSpec(
    vocab_size=49152,
    hidden_size=4096,
    intermediate_size=14336,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    max_context=131072,
    rope_theta=500000.0,
    tie_embeddings=False,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
)
"""Llama-3.1-8B's shape (head_dim 128, separate output head) with the same 49,152-token
vocabulary: 7.38 B parameters."""


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


def random_hf_weights(spec: SyntheticSpec, seed: int = 0) -> dict[str, np.ndarray]:
    """fp32 weights with HF transformers' parameter names and layouts."""
    rng = np.random.default_rng(seed)
    h, inter, hd = spec.hidden_size, spec.intermediate_size, spec.head_dim

    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    def norm() -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(h)).astype(np.float32)

    weights = {"model.embed_tokens.weight": rng.standard_normal((spec.vocab_size, h)).astype(np.float32)}
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        weights[p + "input_layernorm.weight"] = norm()
        weights[p + "self_attn.q_proj.weight"] = mat(spec.num_heads * hd, h)
        weights[p + "self_attn.k_proj.weight"] = mat(spec.num_kv_heads * hd, h)
        weights[p + "self_attn.v_proj.weight"] = mat(spec.num_kv_heads * hd, h)
        if spec.qkv_bias:
            for proj, rows in (("q", spec.num_heads * hd), ("k", spec.num_kv_heads * hd), ("v", spec.num_kv_heads * hd)):
                weights[p + f"self_attn.{proj}_proj.bias"] = (0.1 * rng.standard_normal(rows)).astype(np.float32)
        weights[p + "self_attn.o_proj.weight"] = mat(h, spec.num_heads * hd)
        weights[p + "post_attention_layernorm.weight"] = norm()
        weights[p + "mlp.gate_proj.weight"] = mat(inter, h)
        weights[p + "mlp.up_proj.weight"] = mat(inter, h)
        weights[p + "mlp.down_proj.weight"] = mat(h, inter)
    weights["model.norm.weight"] = norm()
    if not spec.tie_embeddings:
        weights["lm_head.weight"] = mat(spec.vocab_size, h)
    return weights


def write_gguf(
    path: Path,
    spec: SyntheticSpec,
    hf_weights: dict[str, np.ndarray],
    tensor_type: TensorTypeChooser = all_f32,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Write ``hf_weights`` as a GGUF file; return the HF weights the file really holds.

    Types gguf-py can quantize are quantized from the weights; K-quants (which gguf-py only
    dequantizes) get random blocks instead, and the returned weights are what those decode to.
    """
    rng = np.random.default_rng(seed + 1)
    writer = GGUFWriter(str(path), spec.arch)
    _write_metadata(writer, spec)
    held: dict[str, np.ndarray] = {}
    permute = spec.arch in ("llama", "mistral")
    for hf_name, gguf_name in _tensor_names(spec):
        weight = hf_weights[hf_name]
        heads = {"attn_q.weight": spec.num_heads, "attn_k.weight": spec.num_kv_heads}.get(gguf_name.split(".", 2)[-1])
        stored = _permute(weight, heads) if permute and heads else weight
        qtype = tensor_type(gguf_name) if stored.ndim == 2 else GGMLQuantizationType.F32
        raw, decoded = encode_weight(stored, qtype, rng)
        writer.add_tensor(gguf_name, raw, raw_dtype=qtype)
        held[hf_name] = _unpermute(decoded, heads) if permute and heads else decoded
    if spec.rope_scaling and spec.rope_scaling["rope_type"] == "llama3":
        writer.add_tensor("rope_freqs.weight", llama3_rope_factors(spec))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return held


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


def llama3_rope_factors(spec: SyntheticSpec) -> np.ndarray:
    """The ``rope_freqs`` tensor llama.cpp's converter writes for llama-3 RoPE scaling."""
    scaling = spec.rope_scaling or {}
    dim = spec.head_dim
    freqs = 1.0 / (spec.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor = scaling["factor"]
    old_context = scaling["original_max_position_embeddings"]
    low_wavelen = old_context / scaling["low_freq_factor"]
    high_wavelen = old_context / scaling["high_freq_factor"]
    factors = []
    for freq in freqs:
        wavelen = 2 * np.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - scaling["low_freq_factor"]) / (
                scaling["high_freq_factor"] - scaling["low_freq_factor"]
            )
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def _write_metadata(writer: GGUFWriter, spec: SyntheticSpec) -> None:
    writer.add_name(f"synthetic-{spec.arch}")
    writer.add_context_length(spec.max_context)
    writer.add_embedding_length(spec.hidden_size)
    writer.add_feed_forward_length(spec.intermediate_size)
    writer.add_block_count(spec.num_layers)
    writer.add_head_count(spec.num_heads)
    writer.add_head_count_kv(spec.num_kv_heads)
    writer.add_rope_freq_base(spec.rope_theta)
    writer.add_layer_norm_rms_eps(spec.rms_norm_eps)
    writer.add_rope_dimension_count(spec.head_dim)
    if spec.rope_scaling and spec.rope_scaling["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf_constants.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(spec.rope_scaling["factor"])
    tokens, merges = _vocabulary(spec.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIAL_TOKENS else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokens.index("<|endoftext|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML_TEMPLATE)


def _vocabulary(vocab_size: int) -> tuple[list[str], list[str]]:
    """A byte-level BPE vocabulary of exactly ``vocab_size`` tokens trained on a tiny corpus."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    vocab = tokenizer.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    # Pad with unused tokens if the corpus yields fewer merges than asked for.
    tokens += [f"<|unused_{i}|>" for i in range(vocab_size - len(tokens))]
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    return tokens[:vocab_size], merges


def _tensor_names(spec: SyntheticSpec) -> list[tuple[str, str]]:
    names = [("model.embed_tokens.weight", "token_embd.weight")]
    per_layer = [
        ("input_layernorm.weight", "attn_norm.weight"),
        ("self_attn.q_proj.weight", "attn_q.weight"),
        ("self_attn.k_proj.weight", "attn_k.weight"),
        ("self_attn.v_proj.weight", "attn_v.weight"),
        ("self_attn.o_proj.weight", "attn_output.weight"),
        ("post_attention_layernorm.weight", "ffn_norm.weight"),
        ("mlp.gate_proj.weight", "ffn_gate.weight"),
        ("mlp.up_proj.weight", "ffn_up.weight"),
        ("mlp.down_proj.weight", "ffn_down.weight"),
    ]
    if spec.qkv_bias:
        per_layer += [(f"self_attn.{p}_proj.bias", f"attn_{p}.bias") for p in "qkv"]
    for i in range(spec.num_layers):
        names += [(f"model.layers.{i}.{hf}", f"blk.{i}.{g}") for hf, g in per_layer]
    names.append(("model.norm.weight", "output_norm.weight"))
    if not spec.tie_embeddings:
        names.append(("lm_head.weight", "output.weight"))
    return names


def encode_weight(weight: np.ndarray, qtype: GGMLQuantizationType, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(bytes or array to write, the fp32 values the file then holds)."""
    if qtype == GGMLQuantizationType.F32:
        return weight, weight
    if qtype in _KQUANT_F16_FIELDS:
        # Random blocks (gguf-py cannot quantize K-quants), with the fp16 super-block scales
        # then set so the decoded weights have the spread of ``weight``: x is linear in
        # (d, dmin), so one common factor on both scales x exactly.
        block, type_size = GGML_QUANT_SIZES[qtype]
        rows, cols = weight.shape
        raw = rng.integers(0, 256, size=(rows, cols // block, type_size), dtype=np.uint8)
        unit = np.ones((rows, cols // block), dtype=np.float16)
        _set_kquant_scales(raw, qtype, unit)
        spread = float(quants.dequantize(raw.reshape(rows, -1), qtype).std())
        target = float(weight.std()) / spread
        _set_kquant_scales(raw, qtype, (rng.uniform(0.5, 1.5, size=unit.shape) * target).astype(np.float16))
        raw = raw.reshape(rows, -1)
    else:
        raw = quants.quantize(weight, qtype)
    return raw, quants.dequantize(raw, qtype).astype(np.float32).reshape(weight.shape)


def _set_kquant_scales(raw: np.ndarray, qtype: GGMLQuantizationType, scale: np.ndarray) -> None:
    """Write ``scale`` (fp16, one per super-block) into every fp16 scale field of ``raw``."""
    rows, blocks, _ = raw.shape
    for offset in _KQUANT_F16_FIELDS[qtype]:
        raw[:, :, offset : offset + 2] = scale.view(np.uint8).reshape(rows, blocks, 2)


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp converter's Q/K row permutation (rotate-half -> interleaved pairs)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
    return weight.reshape(heads, weight.shape[0] // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _same_type(qtype: GGMLQuantizationType, name: str) -> GGMLQuantizationType:
    return qtype


def _tensor_shapes(spec: SyntheticSpec) -> list[tuple[str, tuple[int, ...]]]:
    """(GGUF name, numpy-order shape) of every tensor :func:`write_gguf` writes, in file order."""
    h, inter = spec.hidden_size, spec.intermediate_size
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    shapes = {
        "token_embd.weight": (spec.vocab_size, h),
        "output.weight": (spec.vocab_size, h),
        "output_norm.weight": (h,),
        "attn_norm.weight": (h,),
        "ffn_norm.weight": (h,),
        "attn_q.weight": (q, h),
        "attn_k.weight": (kv, h),
        "attn_v.weight": (kv, h),
        "attn_output.weight": (h, q),
        "ffn_gate.weight": (inter, h),
        "ffn_up.weight": (inter, h),
        "ffn_down.weight": (h, inter),
        "attn_q.bias": (q,),
        "attn_k.bias": (kv,),
        "attn_v.bias": (kv,),
    }
    names = [name for _, name in _tensor_names(spec)]
    return [(name, shapes[name.split(".", 2)[2] if name.startswith("blk.") else name]) for name in names]


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
