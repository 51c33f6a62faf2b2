"""Prompt logprobs through the engine vs HF transformers on the same tiny random weights.

``llm.prompt_logprobs(ids)`` must equal the log-softmax of one plain full-sequence forward,
whether the prompt is computed in one step, in chunks (chunked prefill), after a prefix of
it was cached by an earlier request, or recomputed after a preemption.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_engine import TinyModel, assert_pool_idle, hf_log_softmax, kv_bytes

from rocmforge import SamplingParams
from rocmforge.outputs import TokenLogprobs

pytest.importorskip("transformers")

TOL = 1e-4


@pytest.fixture(scope="module")
def prompt() -> list[int]:
    return np.random.default_rng(21).integers(0, 320, size=50).tolist()


@pytest.fixture(scope="module")
def reference(tiny_model: TinyModel, prompt: list[int]) -> torch.Tensor:
    return hf_log_softmax(tiny_model, prompt)


def assert_matches(entries: list[TokenLogprobs], ids: list[int], reference: torch.Tensor, top_k: int) -> None:
    assert len(entries) == len(ids) - 1
    for i, entry in enumerate(entries):
        target = ids[i + 1]
        assert entry.token_id == target
        assert abs(entry.logprob - reference[i, target].item()) <= TOL, i
        values, top_ids = reference[i].topk(top_k)
        assert [t for t, _ in entry.top] == top_ids.tolist(), i
        assert all(abs(v - r) <= TOL for (_, v), r in zip(entry.top, values.tolist())), i


def test_reference_is_not_trivial(reference: torch.Tensor, prompt: list[int]) -> None:
    chosen = reference[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
    assert chosen.std() > 0.3  # varies by position
    assert len(set(reference.argmax(dim=-1).tolist())) > 10


def test_prompt_logprobs_match_a_full_forward(make_llm, prompt, reference) -> None:
    llm = make_llm()
    entries = llm.prompt_logprobs(prompt, top_k=3)
    assert_matches(entries, prompt, reference, 3)
    assert_pool_idle(llm)


def test_chunked_prefill(make_llm, prompt, reference) -> None:
    llm = make_llm(block_size=4, max_num_batched_tokens=16, max_num_seqs=4)
    assert len(prompt) > 16
    entries = llm.prompt_logprobs(prompt, top_k=3)
    assert_matches(entries, prompt, reference, 3)
    assert_pool_idle(llm)


def test_with_a_prefix_already_cached(make_llm, prompt, reference) -> None:
    llm = make_llm(block_size=4)
    llm.generate([prompt[:30]], SamplingParams(max_tokens=2, temperature=0.0))
    llm.generate([prompt], SamplingParams(max_tokens=2, temperature=0.0))  # the whole prompt
    assert llm.engine.scheduler.get_stats().prefix_cache_hits > 0  # the cache is warm
    entries = llm.prompt_logprobs(prompt, top_k=3)
    assert_matches(entries, prompt, reference, 3)
    # Chunked as well, on the same warm cache.
    llm2 = make_llm(block_size=4, max_num_batched_tokens=8, max_num_seqs=2)
    llm2.generate([prompt[:40]], SamplingParams(max_tokens=1, temperature=0.0))
    assert_matches(llm2.prompt_logprobs(prompt, top_k=3), prompt, reference, 3)
    assert_pool_idle(llm)
    assert_pool_idle(llm2)


def test_top_zero_and_short_prompts(make_llm, prompt, reference) -> None:
    llm = make_llm()
    entries = llm.prompt_logprobs(prompt[:5], top_k=0)
    assert [e.top for e in entries] == [[]] * 4
    assert all(abs(e.logprob - reference[i, prompt[i + 1]].item()) <= TOL for i, e in enumerate(entries))
    assert llm.prompt_logprobs(prompt[:1]) == []


def test_many_requests_with_preemption(make_llm, tiny_model: TinyModel) -> None:
    """Prompt logprobs of requests batched together, preempted and recomputed, chunked."""
    rng = np.random.default_rng(4)
    prompts = [rng.integers(3, 320, size=n).tolist() for n in (35, 12, 28, 40, 20, 33)]
    llm = make_llm(block_size=4, kv_cache_memory=kv_bytes(20, 4), max_num_batched_tokens=24, max_num_seqs=6)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, prompt_logprobs=2, logprobs=2)
    outputs = llm.generate(prompts, params)
    assert llm.engine.scheduler.get_stats().num_preemptions > 0
    for ids, out in zip(prompts, outputs):
        full = ids + out.token_ids
        reference = hf_log_softmax(tiny_model, full)
        assert out.prompt_logprobs is not None
        assert_matches(out.prompt_logprobs, ids, reference, 2)
        # The generated tokens' logprobs agree with the same forward.
        assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids)
        for j, entry in enumerate(out.logprobs):
            row = len(ids) - 1 + j
            assert entry.token_id == full[row + 1] == reference[row].argmax().item()
            assert abs(entry.logprob - reference[row, full[row + 1]].item()) <= TOL
    assert_pool_idle(llm)
