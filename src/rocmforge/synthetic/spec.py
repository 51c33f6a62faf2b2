"""What a synthetic llama-family GGUF file holds, apart from its tensor data.

In: nothing but constants. Out: :class:`SyntheticSpec` (architecture and sizes) and the
presets :data:`LLAMA_3_2_1B` and :data:`LLAMA_3_1_8B`; the tensor-type chooser contract
(:data:`TensorTypeChooser`, :func:`all_f32`); and, for the two writers
(:mod:`~rocmforge.synthetic.hf_weights`, :mod:`~rocmforge.synthetic.random_weights`), the
parts of the file they share: the metadata (hyperparameters, a real byte-level BPE vocabulary
trained with ``tokenizers`` on a small corpus, a ChatML chat template), the HF -> GGUF tensor
names and shapes in file order, and the llama-3 ``rope_freqs`` tensor. The writers own the
``GGUFWriter``; this module only adds key/value pairs to one.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter
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
    chat_template: str = CHATML_TEMPLATE
    """``tokenizer.chat_template`` (tests write hostile ones)."""
    extra_control_tokens: tuple[str, ...] = ()
    """Control tokens besides ChatML's (a family's markers: ``[TOOL_CALLS]``, ``<|python_tag|>``)."""
    pooling_type: int | None = None
    """``{arch}.pooling_type`` (llama.cpp's enum: 0 none, 1 mean, 2 cls, 3 last, 4 rank);
    None: the key is not written (a generation model)."""

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
    if spec.pooling_type is not None:
        writer.add_pooling_type(gguf_constants.PoolingType(spec.pooling_type))
    control = (*SPECIAL_TOKENS, *spec.extra_control_tokens)
    tokens, merges = _vocabulary(spec.vocab_size, control)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in control else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokens.index("<|endoftext|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_add_bos_token(False)
    writer.add_chat_template(spec.chat_template)


def _vocabulary(vocab_size: int, control: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """A byte-level BPE vocabulary of exactly ``vocab_size`` tokens trained on a tiny corpus,
    the ``control`` tokens first."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(control),
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


def tensor_names(spec: SyntheticSpec) -> list[tuple[str, str]]:
    """Every tensor of ``spec`` as ``(HF name, GGUF name)`` pairs, in file order."""
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
    names = [name for _, name in tensor_names(spec)]
    return [(name, shapes[name.split(".", 2)[2] if name.startswith("blk.") else name]) for name in names]
