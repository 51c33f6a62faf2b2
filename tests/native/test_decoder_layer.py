"""The one-call decoder layer of a decode step (``native.fused.decoder_layer``) against the
module-by-module native path it shortcuts: the same kernels in the same order, so logits and
KV caches must agree to the bit, over batched decode steps of ragged sequences on random
GGUF models (legacy quants, K-quants with a Q|K|V bias, a type held in bf16)."""

from __future__ import annotations

import random

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from rocmforge import native
from rocmforge.attention import AttentionMetadata, get_backend
from rocmforge.gguf import read_gguf
from rocmforge.models.loader import load_model
from rocmforge.synthetic import SyntheticSpec, random_hf_weights, write_gguf

pytestmark = pytest.mark.skipif(native.ops() is None, reason=f"native kernels unavailable: {native.unavailable_reason()}")

BLOCK = 4


def _types(mapping: dict[str, Q]):
    return lambda name: next((t for suffix, t in mapping.items() if name.endswith(suffix)), Q.F32)


CASES = {
    "llama-legacy": (
        SyntheticSpec(arch="llama", hidden_size=128, num_heads=4, num_kv_heads=2, intermediate_size=256),
        _types({"attn_q.weight": Q.Q4_0, "attn_k.weight": Q.Q4_1, "attn_v.weight": Q.Q8_0,
                "attn_output.weight": Q.Q5_0, "ffn_gate.weight": Q.Q5_1, "ffn_up.weight": Q.Q8_0,
                "token_embd.weight": Q.Q8_0}),
    ),
    "qwen2-kquants-bias": (
        SyntheticSpec(arch="qwen2", qkv_bias=True, hidden_size=256, num_heads=8, num_kv_heads=2,
                      intermediate_size=512),
        _types({"attn_q.weight": Q.Q4_K, "attn_k.weight": Q.Q6_K, "attn_v.weight": Q.Q5_K,
                "attn_output.weight": Q.Q3_K, "ffn_gate.weight": Q.Q4_K, "ffn_down.weight": Q.Q6_K}),
    ),
}


def _decode(model, prompts: list[list[int]], steps: int, table_order: list[int]) -> tuple[torch.Tensor, list]:
    """Prefill each prompt, then ``steps`` batched decode steps (greedy); returns the stacked
    decode logits and the KV caches."""
    config = model.config
    num_blocks = len(table_order)
    shape = (num_blocks, BLOCK, config.num_kv_heads, config.head_dim)
    caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(config.num_layers)]
    model.bind_kv_cache(caches)
    per_seq = num_blocks // len(prompts)
    tables = [table_order[i * per_seq:(i + 1) * per_seq] for i in range(len(prompts))]
    tokens = [list(p) for p in prompts]
    logits = []
    with torch.inference_mode():
        for i, prompt in enumerate(prompts):  # prefill: one sequence at a time
            metadata = AttentionMetadata.build([len(prompt)], [len(prompt)], [tables[i]], BLOCK, torch.device("cpu"))
            hidden = model(torch.tensor(prompt), torch.arange(len(prompt)), metadata)
            tokens[i].append(int(model.compute_logits(hidden[-1:]).argmax()))
        for _ in range(steps):
            lens = [len(t) for t in tokens]
            metadata = AttentionMetadata.build([1] * len(tokens), lens, tables, BLOCK, torch.device("cpu"))
            ids = torch.tensor([t[-1] for t in tokens])
            step = model.compute_logits(model(ids, torch.tensor([n - 1 for n in lens]), metadata))
            logits.append(step)
            for t, row in zip(tokens, step):
                t.append(int(row.argmax()))
    return torch.stack(logits), caches


@pytest.mark.parametrize("case", sorted(CASES))
def test_decoder_layer_matches_the_modules(case: str, tmp_path) -> None:
    from rocmforge.native import fused

    spec, types = CASES[case]
    path = tmp_path / f"{case}.gguf"
    write_gguf(path, spec, random_hf_weights(spec, seed=5), tensor_type=types, seed=5)
    with read_gguf(path) as gguf:
        model = load_model(gguf, device=torch.device("cpu"), dtype=torch.float32, attention=get_backend("native"),
                           weight_format="quantized", fused_kernels=True).model
    assert model.layer_kernel is fused.decoder_layer

    calls = {"fused": 0}

    def counted(*args):
        result = fused.decoder_layer(*args)
        calls["fused"] += result is not None
        return result

    seed = random.randrange(2**31)
    rng = random.Random(seed)
    prompts = [[rng.randrange(spec.vocab_size) for _ in range(n)] for n in (5, 11, 2)]
    order = list(range(3 * 8))
    rng.shuffle(order)  # non-contiguous block tables
    model.layer_kernel = counted
    fused_logits, fused_caches = _decode(model, prompts, steps=6, table_order=order)
    assert calls["fused"] == 6 * spec.num_layers  # every decode step, every layer; no prefill
    model.layer_kernel = None
    module_logits, module_caches = _decode(model, prompts, steps=6, table_order=order)
    assert torch.equal(fused_logits, module_logits), f"seed {seed}"
    for (k1, v1), (k2, v2) in zip(fused_caches, module_caches, strict=True):
        assert torch.equal(k1, k2) and torch.equal(v1, v2), f"seed {seed}"
    assert fused_logits.std() > 0.1  # not vacuous
