"""Continuous batching on a real (tiny, random-weight) model: batched == alone, token for token.

Every request must produce exactly the greedy tokens it produces when it runs alone, however
it is batched: many requests in one forward, prefix-cache hits, preemption and recompute
under a tiny KV budget, chunked prefill. A wrong block table, position, causal mask or a
K/V block shared or reused too early changes the tokens. After each run every block is free.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from tiny_engine import StepRecorder, assert_pool_idle, kv_bytes

from rocmforge import LLM, SamplingParams
from rocmforge.outputs import Completion

Prompt = str | list[int]

TEXTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time, in a small village, there lived a curious cat.",
    "def add(a, b):\n    return a + b\n",
    "Caf\u00e9 na\u00efve Z\u00fcrich \u6771\u4eac \U0001f600",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10. The capital of France is Paris. Hello, world! It was the best",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "x",
]
ID_LENGTHS = [1, 2, 3, 7, 12, 19, 26, 33, 41, 50, 60]


def _prompts() -> list[Prompt]:
    rng = np.random.default_rng(5)
    ids: list[Prompt] = [rng.integers(3, 320, size=n).tolist() for n in ID_LENGTHS]
    mixed = [p for pair in zip(TEXTS, ids) for p in pair] + ids[len(TEXTS) :]
    return mixed


PROMPTS = _prompts()


def _params(i: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=8 + (i * 5) % 17)


def _solo(make_llm: Callable[..., LLM], prompts: list[Prompt]) -> list[Completion]:
    """Each prompt alone, in a fresh call, with no prefix cache to hit."""
    llm = make_llm(enable_prefix_caching=False)
    return [llm.generate([p], _params(i))[0] for i, p in enumerate(prompts)]


def _check_same(batched: list[Completion], solo: list[Completion]) -> None:
    assert len(batched) == len(solo)
    for i, (b, s) in enumerate(zip(batched, solo)):
        assert b.prompt_token_ids == s.prompt_token_ids, i
        assert b.token_ids == s.token_ids, f"prompt {i}: batched {b.token_ids} != alone {s.token_ids}"
        assert (b.text, b.finish_reason) == (s.text, "length"), i


@pytest.fixture(scope="module")
def solo(make_llm) -> list[Completion]:
    return _solo(make_llm, PROMPTS)


def test_prompts_and_outputs_are_meaningful(solo: list[Completion]) -> None:
    lengths = [len(c.prompt_token_ids) for c in solo]
    assert len(solo) >= 16 and min(lengths) == 1 and max(lengths) >= 55
    assert any(isinstance(p, str) for p in PROMPTS) and any(isinstance(p, list) for p in PROMPTS)
    assert len({len(c.token_ids) for c in solo}) > 5  # max_tokens varies
    # Not degenerate: outputs differ across prompts and are not one repeated token.
    assert len({tuple(c.token_ids) for c in solo}) == len(solo)
    assert len({t for c in solo for t in c.token_ids}) > 60
    assert all(len(set(c.token_ids)) >= 3 for c in solo)


def test_batch_equals_alone(make_llm, solo: list[Completion]) -> None:
    llm = make_llm(block_size=16, max_num_seqs=32)
    recorder = StepRecorder(llm)
    batched = llm.generate(PROMPTS, [_params(i) for i in range(len(PROMPTS))])
    _check_same(batched, solo)
    assert recorder.max_batch == len(PROMPTS)  # all of them in one forward
    assert_pool_idle(llm)


def test_prefix_cache_hits_give_the_same_tokens(make_llm) -> None:
    rng = np.random.default_rng(9)
    prefix = rng.integers(3, 320, size=40).tolist()  # 10 full blocks of 4
    suffix_lengths = [1, 2, 3, 4, 5, 8, 13, 21, 1, 6]
    prompts: list[Prompt] = [prefix + rng.integers(3, 320, size=n).tolist() for n in suffix_lengths]
    prompts.append(list(prefix))  # the prefix itself: hits capped to leave one token to compute
    expected = _solo(make_llm, prompts)
    # A follow-up turn: the first prompt and its output, then more. Its hit covers blocks
    # whose K/V were written while decoding.
    follow_up = prompts[0] + expected[0].token_ids + [7, 8, 9]
    prompts.append(follow_up)
    expected.append(make_llm(enable_prefix_caching=False).generate([follow_up], _params(len(prompts) - 1))[0])

    llm = make_llm(block_size=4, max_num_seqs=32)
    first = llm.generate([prompts[0]], _params(0))
    _check_same(first, expected[:1])
    stats = llm.engine.scheduler.get_stats()
    hits_before = stats.prefix_cache_hits
    assert hits_before == 0
    batched = llm.generate(prompts, [_params(i) for i in range(len(prompts))])
    _check_same(batched, expected)

    # Whole blocks only, capped to leave one token to compute: 10 blocks for each prompt
    # with a suffix, 9 for the bare prefix, and for the follow-up the 12 blocks the first
    # run filled (41 prompt tokens + 7 fed-back outputs).
    hits = llm.engine.scheduler.get_stats().prefix_cache_hits - hits_before
    assert hits == 4 * (10 * len(suffix_lengths) + 9 + 12)
    assert_pool_idle(llm)


def test_preemption_gives_the_same_tokens(make_llm, solo: list[Completion]) -> None:
    # 40 blocks of 4 tokens: the longest request (60 + 24 tokens) fits alone, all of them
    # together (~900 tokens) by far do not.
    llm = make_llm(block_size=4, kv_cache_memory=kv_bytes(40, 4), max_num_seqs=16)
    assert llm.engine.scheduler.block_manager.num_blocks == 40
    recorder = StepRecorder(llm)
    batched = llm.generate(PROMPTS, [_params(i) for i in range(len(PROMPTS))])
    _check_same(batched, solo)
    assert llm.engine.scheduler.get_stats().num_preemptions > 0
    assert recorder.max_batch > 1
    assert_pool_idle(llm)


def test_chunked_prefill_gives_the_same_tokens(make_llm, solo: list[Completion]) -> None:
    llm = make_llm(block_size=8, max_num_batched_tokens=16, max_num_seqs=8)
    recorder = StepRecorder(llm)
    batched = llm.generate(PROMPTS, [_params(i) for i in range(len(PROMPTS))])
    _check_same(batched, solo)
    assert recorder.num_partial_prefills >= 6
    assert all(sum(n for _, _, n, _ in step) <= 16 for step in recorder.steps)
    # A step mixes decodes with a prefill chunk of another request.
    assert any(
        any(start > 0 and n == 1 for _, start, n, _ in step) and any(not s for *_, s in step)
        for step in recorder.steps
    )
    assert_pool_idle(llm)


def test_everything_at_once(make_llm, solo: list[Completion]) -> None:
    """Chunked prefill, prefix hits and preemption together, twice on one engine."""
    llm = make_llm(block_size=4, kv_cache_memory=kv_bytes(36, 4), max_num_batched_tokens=16, max_num_seqs=6)
    params = [_params(i) for i in range(len(PROMPTS))]
    _check_same(llm.generate(PROMPTS, params), solo)
    order = list(range(len(PROMPTS)))[::-1]
    again = llm.generate([PROMPTS[i] for i in order], [params[i] for i in order])
    _check_same(again, [solo[i] for i in order])
    stats = llm.engine.scheduler.get_stats()
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
    assert_pool_idle(llm)


@pytest.mark.parametrize("fail_after", [0, 3])
def test_a_request_the_runner_gives_no_token_fails_alone(make_llm, solo, fail_after: int) -> None:
    """The scheduler finishes it with ``error``; it gets no phantom token, the others are
    unaffected and its blocks are freed."""
    llm = make_llm(block_size=4)
    execute = llm.engine.runner.execute

    def dropping(out):
        result = execute(out)
        for item in out.scheduled:
            request = item.request
            victim = request.prompt_token_ids == solo[1].prompt_token_ids
            if victim and request.num_output_tokens == fail_after:
                result.sampled.pop(request.request_id, None)
        return result

    llm.engine.runner.execute = dropping  # type: ignore[method-assign]
    outputs = llm.generate(PROMPTS[:4], [_params(i) for i in range(4)])
    failed = outputs[1]
    assert failed.finish_reason == "error"
    assert failed.token_ids == solo[1].token_ids[:fail_after]
    assert failed.text == llm.tokenizer.decode(failed.token_ids, skip_special=True)
    _check_same([outputs[i] for i in (0, 2, 3)], [solo[i] for i in (0, 2, 3)])
    assert_pool_idle(llm)
