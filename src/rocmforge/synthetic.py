"""Random-weight GGUF files of llama-family models, for tests and benchmarks.

In: a :class:`SyntheticSpec` (architecture and sizes), a seed and a tensor-type choice.
Out: a GGUF file laid out exactly as llama.cpp's converter writes one (Q/K rows permuted for
llama/mistral, fused nothing, tied or separate output head, a real byte-level BPE vocabulary
trained with ``tokenizers`` on a small corpus, a ChatML chat template) and the HF-layout fp32
weights the file holds after quantization, so a test can load the same numbers into HF
transformers.
"""

from __future__ import annotations

import json
from collections.abc import Callable
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
