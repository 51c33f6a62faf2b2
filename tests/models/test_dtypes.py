"""bf16 compute and quantized weights on the CPU (the native kernels, and torch's int4/int8
kernels that stand in where the native ones cannot be built), end to end, against the fp32
dense path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from rocmforge import LLM, SamplingParams, native
from rocmforge.gguf import read_gguf
from rocmforge.quant import int4_cpu
from rocmforge.quant.gguf_linear import GGUFLinear
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


@pytest.fixture
def without_native(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a machine without a compiler: the native kernels are unavailable."""
    monkeypatch.setattr(native, "ops", lambda: None)


@pytest.mark.parametrize(
    ("options", "native_kernels"),
    [({"dtype": "bfloat16", "weight_format": "dense"}, True), ({"weight_format": "auto"}, True),
     ({"weight_format": "quantized"}, False)],
    ids=["bf16-dense", "auto-native", "quantized-torch"],
)
def test_fast_paths_track_the_fp32_reference(
    q4_model: Path, options: dict, native_kernels: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = LLM(q4_model, device="cpu", dtype="float32", weight_format="dense")
    if native_kernels and native.ops() is None:
        pytest.skip(f"native kernels unavailable: {native.unavailable_reason()}")
    if not native_kernels:
        if not int4_cpu.available():
            pytest.skip("torch build lacks CPU int4 kernels")
        monkeypatch.setattr(native, "ops", lambda: None)
    fast = LLM(q4_model, device="cpu", **options)
    ids = list(range(3, 3 + 48))
    ref, got = _logprobs(reference, ids), _logprobs(fast, ids)
    mean_delta = sum(abs(a - b) for a, b in zip(ref, got)) / len(ref)
    assert 0 < mean_delta < 0.05, mean_delta  # not the same code path, but the same model
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    [out] = fast.generate(ids[:10], params)
    assert len(out.token_ids) == 8


def test_the_default_cpu_path_computes_on_the_file_blocks(q4_model: Path) -> None:
    if native.ops() is None:
        pytest.skip(f"native kernels unavailable: {native.unavailable_reason()}")
    model = LLM(q4_model, device="cpu").engine.runner.model
    layer = model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, GGUFLinear) and layer.self_attn.qkv_proj.kernels == "native"
    assert "Q4_0[128]|Q4_1[64]|Q4_0[64]" in repr(layer.self_attn.qkv_proj)  # q | k | v parts, as stored
    assert isinstance(model.lm_head, GGUFLinear)
    # The file's bytes as stored, in memory of their own (read, not mapped: the file's
    # page-cache pages are not also counted in the process).
    with read_gguf(q4_model) as gguf:
        for module, name in ((layer.mlp.down_proj, "blk.0.ffn_down.weight"), (model.lm_head, "output.weight")):
            blocks = module.get_buffer("weight_0")
            assert np.array_equal(blocks.reshape(-1).numpy(), gguf.tensor_data(name)), name
            assert _mapped_file(blocks.data_ptr()) != str(q4_model), name


def _mapped_file(address: int) -> str | None:
    """What is mapped at ``address`` in this process (/proc/self/maps): a file's path,
    ``[heap]`` and the like, or None for an anonymous mapping."""
    with open("/proc/self/maps", encoding="utf-8") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= address < end:
                return fields[5].strip() if len(fields) > 5 and fields[5].strip() else None
    return None


@pytest.mark.usefixtures("without_native")
def test_without_native_kernels_quantized_uses_torchs(q4_model: Path) -> None:
    if not int4_cpu.available():
        pytest.skip("torch build lacks CPU int4 kernels")
    model = LLM(q4_model, device="cpu", weight_format="quantized").engine.runner.model
    layer = model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, int4_cpu.Int4Linear)
    assert isinstance(layer.mlp.down_proj, int4_cpu.Int8Linear)  # Q8_0 stays 8-bit
    assert isinstance(model.lm_head, int4_cpu.Int8Linear)
