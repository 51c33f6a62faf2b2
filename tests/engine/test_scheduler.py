"""Scheduler: budgets, chunked prefill, batching, FCFS, preemption, stops, cancel, status.

The fake runner keeps a simulated paged KV cache (slot -> token id) and samples from what it
reads back through the block table, so a wrong table, a block shared too early or a shared
block written over changes the sampled tokens. Sampling is a pure function of a request's
token history, so every request must produce exactly what it would produce running alone.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from rocmforge.config import CacheConfig, SchedulerConfig
from rocmforge.engine.request import FinishReason, Request, RequestState
from rocmforge.engine.scheduler import RunnerOutput, Scheduler, SchedulerOutput
from rocmforge.errors import (
    ConfigError,
    ContextLengthExceededError,
    InvalidRequestError,
    OverloadedError,
    RequestNotFoundError,
)
from rocmforge.sampling_params import SamplingParams


def next_token(history: Sequence[int]) -> int:
    return sum((i + 1) * t for i, t in enumerate(history)) % 97


class FakeRunner:
    def __init__(self, sched: Scheduler, fn: Callable[[Sequence[int]], int] = next_token) -> None:
        self.sched, self.fn = sched, fn
        self.kv: dict[int, int] = {}

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        bm = self.sched.block_manager
        B = bm.block_size
        sampled = {}
        for item in out.scheduled:
            table, end = item.request.block_ids, item.start_pos + item.num_tokens
            assert len(table) * B >= end
            for pos, tok in zip(range(item.start_pos, end), item.token_ids):
                assert bm.blocks[table[pos // B]].ref_count == 1, "write into a shared block"
                self.kv[table[pos // B] * B + pos % B] = tok
            history = [self.kv[table[p // B] * B + p % B] for p in range(end)]
            assert history == item.request.all_token_ids[:end]
            if item.samples:
                sampled[item.request.request_id] = self.fn(history)
        return RunnerOutput(sampled)


def step(sched: Scheduler, runner: FakeRunner) -> SchedulerOutput:
    was_running = set(sched.running)
    out = sched.schedule()
    if out.preempted:  # no admissions in a step that had to preempt
        assert all(item.request in was_running for item in out.scheduled)
    ids = [item.request.request_id for item in out.scheduled]
    assert len(ids) == len(set(ids)), "a request scheduled twice in one step"
    assert all(not item.request.is_finished and item.num_tokens > 0 for item in out.scheduled)
    assert out.num_batched_tokens == sum(i.num_tokens for i in out.scheduled)
    assert out.num_batched_tokens <= sched.scheduler_config.max_num_batched_tokens
    assert sched.num_running <= sched.scheduler_config.max_num_seqs
    sched.update(out, runner.execute(out))
    sched.block_manager.check_invariants(sched.running)
    return out


def drain(sched: Scheduler, runner: FakeRunner, max_steps: int = 10_000) -> int:
    steps = 0
    while sched.has_unfinished():
        step(sched, runner)
        steps += 1
        assert steps < max_steps, "no progress"
    return steps


def solo(prompt: list[int], params: SamplingParams, eos: frozenset[int] = frozenset()):
    tokens, out = list(prompt), []
    while True:
        tok = next_token(tokens)
        tokens.append(tok)
        out.append(tok)
        stop = (tok in eos and not params.ignore_eos) or tok in params.stop_token_ids
        if stop and len(out) >= params.min_tokens:
            return out, FinishReason.STOP
        if len(out) >= params.max_tokens:
            return out, FinishReason.LENGTH


_ids = itertools.count()


def req(prompt: list[int], max_tokens: int = 8, eos: Sequence[int] = (), **kw) -> Request:
    params = SamplingParams(max_tokens=max_tokens, **kw)
    return Request(f"r{next(_ids)}", prompt, params, eos_token_ids=frozenset(eos))


def make(num_blocks=64, block_size=4, caching=True, **kw) -> tuple[Scheduler, FakeRunner]:
    kw.setdefault("max_model_len", 8192)
    sched = Scheduler(SchedulerConfig(**kw), CacheConfig(block_size, caching), num_blocks)
    return sched, FakeRunner(sched)


def test_chunked_prefill_respects_the_budget() -> None:
    sched, runner = make(max_num_batched_tokens=8, max_num_seqs=4)
    r = req(list(range(20)), max_tokens=2)
    sched.add_request(r)
    plan = [(o.scheduled[0].start_pos, o.scheduled[0].num_tokens, o.scheduled[0].samples, r.state)
            for o in (step(sched, runner) for _ in range(4))]
    assert plan == [(0, 8, False, RequestState.PREFILL), (8, 8, False, RequestState.PREFILL),
                    (16, 4, True, RequestState.DECODE), (20, 1, True, RequestState.FINISHED)]
    assert (r.output_token_ids, r.finish_reason) == solo(list(range(20)), r.params)


def test_decodes_are_batched_and_admissions_follow_the_budget() -> None:
    sched, runner = make(max_num_batched_tokens=16, max_num_seqs=8)
    reqs = [req([i, i + 1, i + 2], max_tokens=5) for i in range(6)]
    for r in reqs:
        sched.add_request(r)
    first = step(sched, runner)
    assert [i.num_tokens for i in first.scheduled] == [3, 3, 3, 3, 3, 1]  # 16-token budget
    second = step(sched, runner)
    assert [i.num_tokens for i in second.scheduled] == [1, 1, 1, 1, 1, 2]
    assert all(i.samples for i in second.scheduled)
    drain(sched, runner)
    for r in reqs:
        assert (r.output_token_ids, r.finish_reason) == solo(r.prompt_token_ids, r.params)


def test_max_num_seqs_and_fcfs() -> None:
    sched, runner = make(max_num_seqs=2)
    reqs = [req([i] * 3, max_tokens=3) for i in range(5)]
    for r in reqs:
        sched.add_request(r)
    order: list[str] = []
    while sched.has_unfinished():
        out = step(sched, runner)
        order += [i.request.request_id for i in out.scheduled if i.start_pos == 0]
        assert sched.num_running <= 2
    assert order == [r.request_id for r in reqs]


def test_waiting_head_that_cannot_get_blocks_stops_admission() -> None:
    sched, runner = make(num_blocks=6, block_size=2, max_num_batched_tokens=64)
    a, big, small = req([1] * 6, max_tokens=4), req([2] * 9, max_tokens=2), req([3], max_tokens=2)
    for r in (a, big, small):
        sched.add_request(r)
    out = step(sched, runner)
    assert [i.request for i in out.scheduled] == [a]  # big needs 5 blocks, 3 free: small waits
    assert sched.queue_position(small.request_id) == 1
    drain(sched, runner)
    for r in (a, big, small):
        assert r.output_token_ids == solo(r.prompt_token_ids, r.params)[0]


def test_preemption_recomputes_and_outputs_match_solo() -> None:
    sched, runner = make(num_blocks=10, block_size=2, max_num_batched_tokens=32, max_num_seqs=8)
    reqs = [req([i + 1, i + 2, i + 3, i + 4], max_tokens=12) for i in range(6)]
    for r in reqs:
        sched.add_request(r)
    preempted: list[Request] = []
    while sched.has_unfinished():
        out = step(sched, runner)
        for p in out.preempted:
            assert p.block_ids == [] and p.num_computed_tokens == 0
            assert p.state is RequestState.QUEUED
            assert sched.waiting[0] is out.preempted[-1]
        preempted += out.preempted
    assert preempted and sched.num_preemptions == len(preempted)
    assert sched.block_manager.num_free_blocks == 10
    for r in reqs:
        assert (r.output_token_ids, r.finish_reason) == solo(r.prompt_token_ids, r.params)
    assert any(r.num_preemptions and r.num_cached_tokens > 0 for r in reqs)  # own blocks hit


def test_prefix_hits_skip_computed_tokens() -> None:
    sched, runner = make(block_size=4)
    shared = list(range(10, 22))
    a = req(shared + [1], max_tokens=2)
    sched.add_request(a)
    step(sched, runner)
    b = req(shared + [2], max_tokens=2)
    sched.add_request(b)
    out = step(sched, runner)
    item = next(i for i in out.scheduled if i.request is b)
    assert (item.start_pos, item.num_tokens, b.num_cached_tokens) == (12, 1, 12)
    drain(sched, runner)
    assert b.output_token_ids == solo(b.prompt_token_ids, b.params)[0]
    assert sched.get_stats().prefix_cache_hits == 12


def test_prompt_logprobs_requests_get_no_prefix_hits() -> None:
    sched, runner = make(block_size=4)
    sched.add_request(req(list(range(9)), max_tokens=1))
    step(sched, runner)
    b = req(list(range(9)), max_tokens=1, prompt_logprobs=1)
    sched.add_request(b)
    out = step(sched, runner)
    assert (out.scheduled[0].start_pos, out.scheduled[0].num_tokens) == (0, 9)


@pytest.mark.parametrize(
    ("kw", "eos", "expect_len", "reason"),
    [
        ({"max_tokens": 3}, (), 3, FinishReason.LENGTH),
        ({"max_tokens": 10}, "2nd", 2, FinishReason.STOP),
        ({"max_tokens": 10, "ignore_eos": True}, "2nd", 10, FinishReason.LENGTH),
        ({"max_tokens": 10, "min_tokens": 3}, "2nd", None, None),
        ({"max_tokens": 10, "stop_token_ids": "2nd"}, (), 2, FinishReason.STOP),
        ({"max_tokens": 10, "stop_token_ids": "2nd", "ignore_eos": True}, (), 2, FinishReason.STOP),
    ],
)
def test_stop_conditions(kw: dict, eos, expect_len, reason) -> None:
    prompt = [4, 5, 6]
    second = solo(prompt, SamplingParams(max_tokens=2))[0][1]
    if kw.get("stop_token_ids") == "2nd":
        kw = {**kw, "stop_token_ids": [second]}
    eos = (second,) if eos == "2nd" else eos
    sched, runner = make()
    r = req(prompt, eos=eos, **kw)
    sched.add_request(r)
    drain(sched, runner)
    assert (r.output_token_ids, r.finish_reason) == solo(prompt, r.params, frozenset(eos))
    if expect_len is not None:
        assert (r.num_output_tokens, r.finish_reason) == (expect_len, reason)
    else:  # min_tokens: the eos at position 2 is ignored
        assert r.num_output_tokens >= 3
    assert r.first_token_time is not None and r.finished_time >= r.first_token_time


def test_cancel_frees_blocks_at_once() -> None:
    sched, runner = make(num_blocks=16, max_num_seqs=1)
    running, waiting = req(list(range(9))), req(list(range(5)))
    sched.add_request(running)
    sched.add_request(waiting)
    step(sched, runner)
    assert sched.block_manager.num_free_blocks == 13
    assert sched.finish_request(waiting.request_id, FinishReason.CANCELLED) is waiting
    assert sched.num_waiting == 0 and waiting.finish_reason is FinishReason.CANCELLED
    out = sched.schedule()
    result = runner.execute(out)
    sched.finish_request(running.request_id, FinishReason.CANCELLED)  # before update
    assert sched.block_manager.num_free_blocks == 16 and running.block_ids == []
    assert sched.update(out, result) == []
    assert not sched.has_unfinished() and running.num_output_tokens == 1
    with pytest.raises(RequestNotFoundError):  # finished: forgotten, its reason unchanged
        sched.finish_request(running.request_id, FinishReason.ERROR)
    assert running.finish_reason is FinishReason.CANCELLED
    assert out.finished_request_ids == [waiting.request_id]
    assert sched.schedule().finished_request_ids == [running.request_id]
    with pytest.raises(RequestNotFoundError):
        sched.finish_request("nope", FinishReason.CANCELLED)


def test_missing_runner_token_fails_the_request() -> None:
    sched, _ = make()
    r = req([1, 2])
    sched.add_request(r)
    assert sched.update(sched.schedule(), RunnerOutput({})) == [r]
    assert r.finish_reason is FinishReason.ERROR and r.error and sched.num_running == 0


def test_admission_errors() -> None:
    sched, _ = make(num_blocks=4, block_size=4, max_waiting=2, max_model_len=32)
    with pytest.raises(InvalidRequestError):
        sched.add_request(req([]))
    with pytest.raises(ContextLengthExceededError, match="30 tokens and max_tokens is 3"):
        sched.add_request(req([1] * 30, max_tokens=3))
    with pytest.raises(ContextLengthExceededError, match="pool of 16 tokens"):
        sched.add_request(req([1] * 15, max_tokens=3))
    sched.add_request(req([1] * 15, max_tokens=2))  # 16 tokens of KV: fits exactly
    r = req([1])
    sched.add_request(r)
    with pytest.raises(InvalidRequestError):
        sched.add_request(Request(r.request_id, [1], SamplingParams()))
    with pytest.raises(OverloadedError):
        sched.add_request(req([1]))


def test_status_queries_and_finished_requests_are_forgotten() -> None:
    """The scheduler keeps no history: a request it finished is handed back by ``update``
    once and is then unknown (the async engine's status board keeps finished statuses)."""
    sched = Scheduler(SchedulerConfig(max_num_seqs=1, max_model_len=8192), CacheConfig(4), 32)
    runner = FakeRunner(sched)
    reqs = [req([7, 8], max_tokens=1) for _ in range(3)]
    for r in reqs:
        sched.add_request(r)
    assert [sched.queue_position(r.request_id) for r in reqs] == [0, 1, 2]
    step(sched, runner)
    assert reqs[0].is_finished
    assert [sched.queue_position(r.request_id) for r in reqs[1:]] == [0, 1]
    with pytest.raises(RequestNotFoundError):
        sched.get_request(reqs[0].request_id)  # finished in the step above: forgotten
    assert not sched.is_live(reqs[0].request_id) and sched.is_live(reqs[1].request_id)
    drain(sched, runner)
    assert reqs[2].finish_reason is FinishReason.LENGTH
    assert not any(sched.is_live(r.request_id) for r in reqs)
    assert not sched.has_unfinished()
    with pytest.raises(RequestNotFoundError):
        sched.queue_position("nope")
    with pytest.raises(RequestNotFoundError):
        sched.finish_request(reqs[2].request_id, FinishReason.CANCELLED)  # not live any more


def test_config_validation() -> None:
    for bad in ({"block_size": 3}, {"block_size": 512}, {"kv_cache_memory": 0}, {"block_size": True}):
        with pytest.raises(ConfigError):
            CacheConfig(**bad)
    for bad in ({"max_num_seqs": 0}, {"max_num_seqs": 8, "max_num_batched_tokens": 4}):
        with pytest.raises(ConfigError):
            SchedulerConfig(**bad)
    with pytest.raises(ConfigError):
        Scheduler(SchedulerConfig(), CacheConfig(), 16)  # max_model_len not resolved
    with pytest.raises(ConfigError):
        Scheduler(SchedulerConfig(max_model_len=64), CacheConfig(), 0)


# --- property test: random interleavings on small pools ------------------------------------

SUBMIT = st.tuples(st.just("submit"), st.integers(0, 2), st.lists(st.integers(0, 96), max_size=6),
                   st.integers(1, 10), st.integers(0, 3), st.sampled_from([(), (0,), (5, 50)]))
OPS = st.one_of(SUBMIT, SUBMIT, st.tuples(st.just("step")), st.tuples(st.just("step")),
                st.tuples(st.sampled_from(["cancel", "stop"]), st.integers(0, 40)))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    num_blocks=st.integers(4, 32),
    block_size=st.sampled_from([1, 2, 2, 4, 8]),
    max_num_seqs=st.integers(1, 6),
    extra_budget=st.integers(0, 24),
    max_waiting=st.integers(1, 12),
    caching=st.booleans(),
    prefixes=st.lists(st.lists(st.integers(0, 4), max_size=10), min_size=3, max_size=3),
    ops=st.lists(OPS, min_size=10, max_size=60),
)
def test_random_interleavings_keep_the_pool_consistent(
    num_blocks, block_size, max_num_seqs, extra_budget, max_waiting, caching, prefixes, ops
) -> None:
    budget = max_num_seqs + extra_budget
    sched, runner = make(num_blocks, block_size, caching, max_waiting=max_waiting,
                         max_num_seqs=max_num_seqs, max_num_batched_tokens=budget)
    accepted: list[Request] = []
    ended_early: set[str] = set()
    for op in ops:
        if op[0] == "submit":
            _, k, suffix, max_tokens, min_tokens, eos = op
            prompt = prefixes[k] + suffix
            r = req(prompt, max_tokens, eos, min_tokens=min(min_tokens, max_tokens))
            if not prompt:
                expected = InvalidRequestError
            elif -(-(len(prompt) + max_tokens - 1) // block_size) > num_blocks:
                expected = ContextLengthExceededError
            elif sched.num_waiting >= max_waiting:
                expected = OverloadedError
            else:
                expected = None
            if expected is None:
                sched.add_request(r)
                accepted.append(r)
            else:
                with pytest.raises(expected):
                    sched.add_request(r)
        elif op[0] == "step":
            step(sched, runner)
        elif accepted:
            target = accepted[op[1] % len(accepted)]
            reason = FinishReason.CANCELLED if op[0] == "cancel" else FinishReason.STOP
            if target.is_finished:  # forgotten by the scheduler
                with pytest.raises(RequestNotFoundError):
                    sched.finish_request(target.request_id, reason)
            else:
                ended_early.add(target.request_id)
                assert sched.finish_request(target.request_id, reason) is target
            assert target.is_finished and target.block_ids == []
        sched.block_manager.check_invariants(sched.running)
        assert all(not r.block_ids for r in sched.waiting)
        assert all(r.num_output_tokens <= r.params.max_tokens for r in accepted)
    drain(sched, runner, max_steps=5_000)
    bm = sched.block_manager
    event(f"preempted: {sched.num_preemptions > 0}, prefix hits: {bm.prefix_cache_hits > 0}")
    event(f"requests accepted: {min(len(accepted), 5)}{'+' if len(accepted) >= 5 else ''}")
    assert bm.num_free_blocks == num_blocks and bm.usage == 0.0
    bm.check_invariants([])
    for r in accepted:
        assert r.is_finished and r.block_ids == []
        expected_out, expected_reason = solo(r.prompt_token_ids, r.params, r.eos_token_ids)
        if r.request_id in ended_early:
            assert r.output_token_ids == expected_out[: r.num_output_tokens]
        else:
            assert (r.output_token_ids, r.finish_reason) == (expected_out, expected_reason)


@settings(max_examples=150, deadline=None)
@given(
    num_blocks=st.integers(4, 16),
    block_size=st.sampled_from([1, 2, 4]),
    max_num_seqs=st.integers(2, 6),
    extra_budget=st.integers(0, 16),
    prefix=st.lists(st.integers(0, 96), min_size=4, max_size=12),
    jobs=st.lists(st.tuples(st.integers(0, 4), st.integers(4, 12)), min_size=3, max_size=8),
)
def test_tight_pools_preempt_and_still_match_solo_runs(
    num_blocks, block_size, max_num_seqs, extra_budget, prefix, jobs
) -> None:
    sched, runner = make(num_blocks, block_size, True, max_num_seqs=max_num_seqs,
                         max_num_batched_tokens=max_num_seqs + extra_budget)
    reqs = [req(prefix + [i] * n, max_tokens) for i, (n, max_tokens) in enumerate(jobs)]
    fits = sched.block_manager.blocks_needed
    reqs = [r for r in reqs if fits(r.num_tokens + r.params.max_tokens - 1) <= num_blocks]
    for r in reqs:
        sched.add_request(r)
    drain(sched, runner, max_steps=5_000)
    hits = sched.block_manager.prefix_cache_hits
    event(f"preempted: {sched.num_preemptions > 0}, prefix hits: {hits > 0}")
    assert sched.block_manager.num_free_blocks == num_blocks
    for r in reqs:
        assert (r.output_token_ids, r.finish_reason) == solo(r.prompt_token_ids, r.params)
