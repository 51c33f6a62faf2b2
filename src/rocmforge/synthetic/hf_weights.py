"""GGUF files whose weights an HF transformers model can load too, for parity tests.

In: a :class:`~rocmforge.synthetic.spec.SyntheticSpec`, fp32 weights with HF names and
layouts (:func:`random_hf_weights`, or the caller's), a tensor-type choice and a seed.
Out: a GGUF file laid out exactly as llama.cpp's converter writes one (Q/K rows permuted for
llama/mistral, fused nothing, tied or separate output head) and the HF-layout fp32 weights
the file holds after quantization (:func:`write_gguf`), so a test can load the same numbers
into HF transformers. :func:`encode_weight` turns one matrix into its stored encoding and
the values that encoding decodes to. The caller owns the weight dicts; nothing here keeps
state between calls.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, quants

from rocmforge.synthetic.spec import (
    SyntheticSpec,
    TensorTypeChooser,
    _write_metadata,
    all_f32,
    llama3_rope_factors,
    tensor_names,
)

# Byte offsets of the fp16 super-block scale fields of the K-quants (ggml-common.h).
_KQUANT_F16_FIELDS = {
    GGMLQuantizationType.Q2_K: (80, 82),
    GGMLQuantizationType.Q3_K: (108,),
    GGMLQuantizationType.Q4_K: (0, 2),
    GGMLQuantizationType.Q5_K: (0, 2),
    GGMLQuantizationType.Q6_K: (208,),
}


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
    for hf_name, gguf_name in tensor_names(spec):
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
        spread = float(np.std(quants.dequantize(raw.reshape(rows, -1), qtype)))
        target = float(weight.std()) / spread
        _set_kquant_scales(raw, qtype, np.asarray(rng.uniform(0.5, 1.5, size=unit.shape) * target, dtype=np.float16))
        raw = raw.reshape(rows, -1)
    else:
        raw = quants.quantize(weight, qtype)
    return raw, np.asarray(quants.dequantize(raw, qtype), dtype=np.float32).reshape(weight.shape)


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
