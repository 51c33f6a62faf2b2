"""bf16 compute and quantized weights on the CPU, end to end, against the fp32 dense path."""

from __future__ import annotations

from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as Q

from rocmforge import LLM, SamplingParams
from rocmforge.quant import int4_cpu
from rocmforge.synthetic import SyntheticSpec, random_hf_weights, write_gguf

SPEC = SyntheticSpec(hidden_size=128, intermediate_size=256, num_heads=4, num_kv_heads=2, tie_embeddings=False)


@pytest.fixture(scope="module")
def q4_model(tmp_path_factory) -> Path:
    """Q4_0 / Q4_1 / Q8_0 matmul weights: exercises the int4 and int8 kernels."""
    path = tmp_path_factory.mktemp("dtypes") / "q4.gguf"
    types = {"attn_q.weight": Q.Q4_0, "attn_k.weight": Q.Q4_1, "attn_v.weight": Q.Q4_0,
             "attn_output.weight": Q.Q4_1, "ffn_gate.weight": Q.Q4_0, "ffn_up.weight": Q.Q4_0,
             "ffn_down.weight": Q.Q8_0, "output.weight": Q.Q8_0}

    def choose(name: str) -> Q:
        return next((t for suffix, t in types.items() if name.endswith(suffix)), Q.F32)

    write_gguf(path, SPEC, random_hf_weights(SPEC, seed=5), tensor_type=choose)
    return path


def _logprobs(llm: LLM, ids: list[int]) -> list[float]:
    return [e.logprob for e in llm.prompt_logprobs(ids, top_k=0)]


@pytest.mark.parametrize(
    "options",
    [{"dtype": "bfloat16"}]
    + ([{"weight_format": "quantized"}] if int4_cpu.available() else []),
    ids=lambda o: "-".join(f"{v}" for v in o.values()),
)
def test_fast_paths_track_the_fp32_reference(q4_model: Path, options: dict) -> None:
    reference = LLM(q4_model, device="cpu", dtype="float32")
    fast = LLM(q4_model, device="cpu", **options)
    ids = list(range(3, 3 + 48))
    ref, got = _logprobs(reference, ids), _logprobs(fast, ids)
    mean_delta = sum(abs(a - b) for a, b in zip(ref, got)) / len(ref)
    assert 0 < mean_delta < 0.05, mean_delta  # not the same code path, but the same model
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    [out] = fast.generate(ids[:10], params)
    assert len(out.token_ids) == 8


def test_quantized_layers_are_used(q4_model: Path) -> None:
    if not int4_cpu.available():
        pytest.skip("torch build lacks CPU int4 kernels")
    model = LLM(q4_model, device="cpu", weight_format="quantized").engine.runner.model
    layer = model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, int4_cpu.Int4Linear)
    assert isinstance(layer.mlp.down_proj, int4_cpu.Int8Linear)  # Q8_0 stays 8-bit
    assert isinstance(model.lm_head, int4_cpu.Int8Linear)
