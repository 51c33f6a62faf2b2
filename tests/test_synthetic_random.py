"""``write_random_gguf``: random-weight GGUF files of any supported type, and the presets.

Small specs of every type go through rocmforge's own reader, dequantizer and ``LLM``; the
decoded weights must have the intended spread; the Q4_K_M chooser must pick llama.cpp's
types (the expected layer lists are written out by hand from ``use_more_bits``); the presets
must have the real models' shapes (parameter counts from HF transformers on the meta device,
checked against the published counts less the vocabulary difference).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType

from rocmforge import LLM
from rocmforge.gguf import read_gguf
from rocmforge.gguf.dequant import dequantize
from rocmforge.synthetic import (
    LLAMA_3_1_8B,
    LLAMA_3_2_1B,
    RANDOM_TYPES,
    SyntheticSpec,
    q4_k_m_types,
    write_random_gguf,
)

T = GGMLQuantizationType
# K-quants need rows of whole 256-element super-blocks, so the smallest useful width is 256.
SPEC = SyntheticSpec(
    vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4, num_kv_heads=2,
    tie_embeddings=False,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64},
)
PER_LAYER = {
    "attn_norm.weight": (256,), "attn_q.weight": (256, 256), "attn_k.weight": (128, 256),
    "attn_v.weight": (128, 256), "attn_output.weight": (256, 256), "ffn_norm.weight": (256,),
    "ffn_gate.weight": (512, 256), "ffn_up.weight": (512, 256), "ffn_down.weight": (256, 512),
}
EXPECTED_SHAPES = {
    "token_embd.weight": (512, 256), "output_norm.weight": (256,), "output.weight": (512, 256),
    "rope_freqs.weight": (32,),
    **{f"blk.{i}.{name}": shape for i in range(2) for name, shape in PER_LAYER.items()},
}


def _decoded(path: Path) -> dict[str, tuple[GGMLQuantizationType, torch.Tensor]]:
    with read_gguf(path) as gguf:
        assert {name: info.shape for name, info in gguf.tensors.items()} == EXPECTED_SHAPES
        return {
            name: (info.ggml_type, dequantize(torch.from_numpy(gguf.tensor_data(name).copy()), info.ggml_type,
                                              info.shape))
            for name, info in gguf.tensors.items()
        }


def _finite_logprobs(llm: LLM) -> list[float]:
    entries = llm.prompt_logprobs(list(range(3, 40)), top_k=1)
    return [e.logprob for e in entries] + [lp for e in entries for _, lp in e.top]


@pytest.mark.parametrize("qtype", sorted(RANDOM_TYPES, key=lambda t: t.name), ids=lambda t: t.name)
def test_each_type_reads_decodes_with_the_intended_spread_and_runs(tmp_path: Path, qtype: GGMLQuantizationType) -> None:
    path = tmp_path / "model.gguf"
    write_random_gguf(path, SPEC, qtype, seed=3)
    tensors = _decoded(path)
    for name, (stored, values) in tensors.items():
        assert torch.isfinite(values).all(), name
        if values.ndim == 1:
            assert stored == T.F32, name
            continue
        assert stored == qtype, name
        target = 1 / math.sqrt(values.shape[1])
        rms = values.square().mean().sqrt().item()
        assert 0.85 * target < rms < 1.15 * target, (name, rms / target)
        assert abs(values.mean().item()) < 0.15 * rms, name
        assert values.std().item() > 0.9 * rms, name  # a spread, not a constant
    norm = tensors["blk.0.attn_norm.weight"][1]
    assert (norm - 1).abs().max() < 0.6 and norm.std() > 0.05

    llm = LLM(path, device="cpu", max_model_len=64)
    logprobs = _finite_logprobs(llm)
    assert all(math.isfinite(lp) and lp <= 0 for lp in logprobs)
    assert max(logprobs) > -math.log(SPEC.vocab_size) + 0.5  # the model prefers some tokens


def test_q4_k_m_file_has_the_mix_and_runs_quantized(tmp_path: Path) -> None:
    path = tmp_path / "q4km.gguf"
    write_random_gguf(path, SPEC, q4_k_m_types(SPEC))
    types = {name: stored for name, (stored, _) in _decoded(path).items()}
    # 2 layers: use_more_bits picks both (the first and last eighth round to layer 0 and all).
    assert types["output.weight"] == T.Q6_K and types["token_embd.weight"] == T.Q4_K
    assert types["blk.1.attn_v.weight"] == T.Q6_K and types["blk.1.ffn_down.weight"] == T.Q6_K
    assert types["blk.1.attn_q.weight"] == T.Q4_K and types["blk.1.ffn_norm.weight"] == T.F32
    for weight_format in ("dense", "quantized"):
        logprobs = _finite_logprobs(LLM(path, device="cpu", weight_format=weight_format, max_model_len=64))
        assert all(math.isfinite(lp) for lp in logprobs), weight_format


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    for qtype in (T.F16, T.Q4_K):
        a, b, c = (tmp_path / f"{qtype.name}-{i}.gguf" for i in range(3))
        write_random_gguf(a, SPEC, qtype, seed=1)
        write_random_gguf(b, SPEC, qtype, seed=1)
        write_random_gguf(c, SPEC, qtype, seed=2)
        assert a.read_bytes() == b.read_bytes()
        with read_gguf(a) as fa, read_gguf(c) as fc:
            assert not np.array_equal(fa.tensor_data("blk.0.ffn_up.weight"), fc.tensor_data("blk.0.ffn_up.weight"))
            # every matrix gets its own stream: no two tensors repeat each other's bytes
            assert not np.array_equal(fa.tensor_data("blk.0.ffn_up.weight"), fa.tensor_data("blk.0.ffn_gate.weight"))


def _types_by_layer(spec: SyntheticSpec, suffix: str) -> list[GGMLQuantizationType]:
    choose = q4_k_m_types(spec)
    return [choose(f"blk.{i}.{suffix}") for i in range(spec.num_layers)]


def test_q4_k_m_chooser_matches_llama_cpp_for_8b() -> None:
    choose = q4_k_m_types(LLAMA_3_1_8B)
    assert choose("output.weight") == T.Q6_K
    assert choose("token_embd.weight") == T.Q4_K  # untied: llama.cpp keeps the base type
    # use_more_bits for 32 layers: 0-3, 28-31 and (i - 4) % 3 == 2, i.e. 6, 9, ..., 27.
    six = {0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31}
    expected = [T.Q6_K if i in six else T.Q4_K for i in range(32)]
    assert _types_by_layer(LLAMA_3_1_8B, "attn_v.weight") == expected
    assert _types_by_layer(LLAMA_3_1_8B, "ffn_down.weight") == expected
    for suffix in ("attn_q.weight", "attn_k.weight", "attn_output.weight", "ffn_gate.weight", "ffn_up.weight"):
        assert set(_types_by_layer(LLAMA_3_1_8B, suffix)) == {T.Q4_K}, suffix


def test_q4_k_m_chooser_matches_llama_cpp_for_tied_1b() -> None:
    choose = q4_k_m_types(LLAMA_3_2_1B)
    assert choose("token_embd.weight") == T.Q6_K  # tied: it is the output head
    six = {0, 1, 4, 7, 10, 13, 14, 15}  # 16 layers: 0-1, 14-15 and (i - 2) % 3 == 2
    expected = [T.Q6_K if i in six else T.Q4_K for i in range(16)]
    assert _types_by_layer(LLAMA_3_2_1B, "attn_v.weight") == expected
    assert _types_by_layer(LLAMA_3_2_1B, "ffn_down.weight") == expected
    assert set(_types_by_layer(LLAMA_3_2_1B, "ffn_up.weight")) == {T.Q4_K}


def test_q4_k_m_chooser_falls_back_like_llama_cpp_for_narrow_rows() -> None:
    narrow = SyntheticSpec(hidden_size=64, intermediate_size=512, num_layers=8, tie_embeddings=False)
    choose = q4_k_m_types(narrow)
    assert choose("output.weight") == T.Q8_0
    assert choose("blk.0.attn_v.weight") == T.Q8_0  # Q6_K on a 64-wide row
    assert choose("blk.2.attn_q.weight") == T.Q5_0  # Q4_K on a 64-wide row
    assert choose("blk.0.ffn_down.weight") == T.Q6_K  # 512 input features: whole super-blocks
    assert choose("blk.2.ffn_down.weight") == T.Q4_K


def test_refuses_types_it_cannot_make_and_partial_blocks(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="IQ4_NL"):
        write_random_gguf(tmp_path / "a.gguf", SPEC, T.IQ4_NL)
    with pytest.raises(ValueError, match="not whole Q4_K blocks"):
        write_random_gguf(tmp_path / "b.gguf", SyntheticSpec(hidden_size=64), T.Q4_K)


@pytest.mark.parametrize(
    ("spec", "parameters", "head_dim"),
    [
        # Published counts with the 128,256-token vocabulary, less the rows of the smaller one.
        (LLAMA_3_2_1B, 1_235_814_400 - (128_256 - 49_152) * 2048, 64),  # tied: one table
        (LLAMA_3_1_8B, 8_030_261_248 - 2 * (128_256 - 49_152) * 4096, 128),  # embeddings + head
    ],
    ids=["1b", "8b"],
)
def test_presets_have_the_real_shapes(spec: SyntheticSpec, parameters: int, head_dim: int) -> None:
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**spec.hf_config()))
    assert sum(p.numel() for p in model.parameters()) == parameters
    assert model.config.head_dim == spec.head_dim == head_dim
    assert spec.vocab_size == 49_152 and spec.rope_theta == 500_000.0
    assert spec.rope_scaling is not None and spec.rope_scaling["rope_type"] == "llama3"
