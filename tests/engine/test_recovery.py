"""Recovery from failed steps (:mod:`rocmforge.engine.recovery`) on the tiny model, in-process.

* Out of device memory (``ROCMFORGE_FAULT_INJECT=oom_over:<tokens>``, or a runner that raises
  torch's own errors): the step shrinks (preempting the latest admitted requests) and runs
  again, and every request still gets exactly the greedy tokens it gets alone; only a request
  that does not fit even alone fails; the retries are bounded.
* Transient device errors (``transient:<n>``): the same step runs again after 10, 20, 40,
  80 ms; beyond that the batch goes down the isolation path and fails cleanly.

Every wait is bounded (``asyncio.wait_for``; engine loops cap their step counts).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from tiny_engine import StepRecorder, assert_pool_idle

import rocmforge.engine.recovery as recovery_module
from rocmforge import LLM, SamplingParams
from rocmforge.config import CacheConfig, SchedulerConfig
from rocmforge.engine.async_engine import AsyncEngine
from rocmforge.engine.recovery import RecoveryPolicy
from rocmforge.engine.request import FinishReason, Request, RequestState
from rocmforge.engine.scheduler import RunnerOutput, Scheduler, StepLimits
from rocmforge.errors import (
    ConfigError,
    DeviceError,
    DeviceOutOfMemoryError,
    EngineDeadError,
    ModelExecutionError,
    OutOfKVBlocksError,
    OverloadedError,
    ServerDrainingError,
    is_transient,
)
from rocmforge.outputs import Completion
from rocmforge.testing.fault_spec import FaultInjection

LENGTHS = [3, 9, 17, 30, 5, 12, 41, 2, 22, 7]
PROMPTS: list[list[int]] = [np.random.default_rng(3).integers(3, 320, size=n).tolist() for n in LENGTHS]
OOM_OVER = 24
"""Batched tokens above which the injected fault runs out of memory: below the first step's
(every prompt at once) and below the longest prompt alone (it must be chunked)."""
K = RecoveryPolicy().max_transient_retries
BACKOFFS = [0.01, 0.02, 0.04, 0.08]
ASYNC_TIMEOUT_S = 60.0
CPU_OOM_MESSAGE = ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                   "you tried to allocate 1125899906842624 bytes. Error code 12 (Cannot allocate memory)")


def params(i: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=6 + (i * 5) % 11)


@pytest.fixture(scope="module")
def solo(make_llm: Callable[..., LLM]) -> list[Completion]:
    """Each prompt alone on a fault-free engine: the tokens every batched run must match."""
    llm = make_llm(enable_prefix_caching=False)
    return [llm.generate([p], params(i))[0] for i, p in enumerate(PROMPTS)]


def check_same(batched: list[Completion], solo: list[Completion]) -> None:
    assert len(batched) == len(solo)
    for i, (b, s) in enumerate(zip(batched, solo)):
        assert b.token_ids == s.token_ids, f"prompt {i}: {b.token_ids} != alone {s.token_ids}"
        assert b.finish_reason == s.finish_reason == "length", i


def run_engine(llm: LLM, requests: dict[str, tuple[list[int], SamplingParams]],
               max_steps: int = 2000) -> dict[str, tuple[list[int], str | None, str | None]]:
    """Add ``requests`` together and step to the end: id -> (tokens, finish reason, error)."""
    engine = llm.engine
    for rid, (prompt, sp) in requests.items():
        engine.add_request(rid, prompt, sp)
    tokens: dict[str, list[int]] = {rid: [] for rid in requests}
    finals: dict[str, tuple[str | None, str | None]] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            break
        for output in engine.step():
            tokens[output.request_id].extend(output.new_token_ids)
            if output.finished:
                finals[output.request_id] = (output.finish_reason, output.error)
    assert not engine.has_unfinished(), "no progress"
    return {rid: (tokens[rid], *finals[rid]) for rid in requests}


def step_tokens(recorder: StepRecorder) -> list[int]:
    return [sum(n for _, _, n, _ in step) for step in recorder.steps]


# --- out of memory ------------------------------------------------------------------------------


def test_oom_steps_shrink_and_every_request_gets_its_tokens_alone(
    make_llm: Callable[..., LLM], solo: list[Completion], caplog: pytest.LogCaptureFixture
) -> None:
    llm = make_llm(enable_prefix_caching=False, faults=FaultInjection(oom_over=OOM_OVER))
    recorder = StepRecorder(llm)
    with caplog.at_level(logging.DEBUG, logger="rocmforge"):
        batched = llm.generate(PROMPTS, [params(i) for i in range(len(PROMPTS))])
    check_same(batched, solo)

    scheduler = llm.engine.scheduler
    assert scheduler.num_preemptions > 0
    sizes = step_tokens(recorder)
    assert sizes[0] == sum(LENGTHS) and max(sizes) > OOM_OVER  # attempted, ran out of memory
    oom = [r for r in caplog.records if r.name == "rocmforge.engine.recovery" and "out of memory" in r.message]
    assert oom and all(r.levelno == logging.WARNING for r in oom)
    assert oom[0].message.startswith(f"out of memory on cpu running a step of {len(PROMPTS)} requests")
    assert "preempted" in oom[0].message
    assert "DefaultCPUAllocator: can't allocate memory" in oom[0].message  # torch's message is kept
    # Each preemption is logged on the request's behalf.
    preempted = [r for r in caplog.records if r.message.startswith("preempted request")]
    assert preempted and all(r.request_id in r.message for r in preempted)
    assert "running them one at a time" not in caplog.text  # OOM is not sent down the isolation path
    assert_pool_idle(llm)


def test_oom_under_the_async_engine(make_llm: Callable[..., LLM], solo: list[Completion]) -> None:
    """Many concurrent requests through the server's engine: all complete, token for token as
    alone, and the preemption counter (the one /metrics exports) moved."""
    llm = make_llm(enable_prefix_caching=False, faults=FaultInjection(oom_over=OOM_OVER))

    async def main() -> None:
        engine = AsyncEngine.from_llm(llm)
        engine.start()
        try:
            streams = await asyncio.gather(*(engine.submit(p, params(i), f"oom-{i}") for i, p in enumerate(PROMPTS)))
            results = await asyncio.gather(*(s.result() for s in streams))
            check_same(results, solo)
            assert engine.stats().num_preemptions > 0
            assert sum(engine.status(f"oom-{i}").num_preemptions for i in range(len(PROMPTS))) > 0
            assert engine.is_alive and engine.is_running
        finally:
            await engine.shutdown(timeout=2.0)

    asyncio.run(asyncio.wait_for(main(), ASYNC_TIMEOUT_S))
    assert_pool_idle(llm)


def test_a_request_that_does_not_fit_even_alone_fails_and_the_others_complete(
    make_llm: Callable[..., LLM], solo: list[Completion], monkeypatch: pytest.MonkeyPatch
) -> None:
    llm = make_llm(enable_prefix_caching=False)
    runner = llm.engine.runner
    forward = runner._execute
    freed = []

    def hungry(scheduled: list[Any]) -> Any:
        if any(item.request.request_id == "hog" for item in scheduled):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return forward(scheduled)

    monkeypatch.setattr(runner, "_execute", hungry)
    monkeypatch.setattr(runner, "free_cached_memory", lambda: freed.append(1))
    others = {f"ok-{i}": (PROMPTS[i], params(i)) for i in (1, 3, 6)}
    results = run_engine(llm, {"hog": (PROMPTS[2], params(2)), **others})

    tokens, reason, error = results["hog"]
    assert (tokens, reason) == ([], "error")
    assert error is not None and error.startswith("DeviceOutOfMemoryError: out of memory on cpu")
    assert "even alone" in error and "Tried to allocate 20.00 GiB" in error
    for i in (1, 3, 6):
        assert results[f"ok-{i}"] == (solo[i].token_ids, "length", None), i
    assert llm.engine.scheduler.num_preemptions > 0
    assert len(freed) > 1  # the allocator's cache is emptied after each out-of-memory error
    assert_pool_idle(llm)


def test_oom_retries_are_bounded(make_llm: Callable[..., LLM], monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing fits (and the step never gets down to one token): after max_oom_retries
    smaller steps the step fails with the out-of-memory error."""
    llm = make_llm()
    llm.engine.recovery = RecoveryPolicy(max_oom_retries=2)

    def broken(scheduled: list[Any]) -> Any:
        raise RuntimeError(CPU_OOM_MESSAGE)

    monkeypatch.setattr(llm.engine.runner, "_execute", broken)
    recorder = StepRecorder(llm)
    engine = llm.engine
    for i in (3, 6, 8, 4):
        engine.add_request(f"r{i}", PROMPTS[i], params(i))
    with pytest.raises(DeviceOutOfMemoryError) as info:
        engine.step()
    assert isinstance(info.value.__cause__, RuntimeError)
    assert len(recorder.steps) == 3  # the step and two smaller ones
    sizes = [len(step) for step in recorder.steps]
    assert sizes == [4, 2, 1], sizes
    for i in (3, 6, 8, 4):
        engine.abort(f"r{i}")
    assert_pool_idle(llm)


@pytest.mark.parametrize("error", [
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total)"),
    RuntimeError(CPU_OOM_MESSAGE),
    RuntimeError("HIP out of memory. Tried to allocate 1.50 GiB"),
], ids=["cuda", "cpu", "hip"])
def test_the_runner_translates_torch_out_of_memory(
    make_llm: Callable[..., LLM], monkeypatch: pytest.MonkeyPatch, error: RuntimeError
) -> None:
    llm = make_llm()
    runner = llm.engine.runner
    freed = []
    monkeypatch.setattr(runner, "free_cached_memory", lambda: freed.append(1))

    def failing(scheduled: list[Any]) -> Any:
        raise error

    monkeypatch.setattr(runner, "_execute", failing)
    llm.engine.add_request("a", PROMPTS[1], params(1))
    llm.engine.add_request("b", PROMPTS[4], params(4))
    out = llm.engine.scheduler.schedule()
    with pytest.raises(DeviceOutOfMemoryError) as info:
        runner.execute(out)  # raised as is: no per-request isolation for out-of-memory
    assert info.value.__cause__ is error
    num_tokens = LENGTHS[1] + LENGTHS[4]
    assert info.value.message.startswith(f"out of memory on cpu running a step of 2 requests ({num_tokens} tokens): ")
    assert str(error).splitlines()[0] in info.value.message
    assert info.value.details["num_tokens"] == num_tokens
    assert freed == [1]
    for rid in ("a", "b"):
        llm.engine.abort(rid)


def test_real_cpu_allocation_failures_are_recognised(
    make_llm: Callable[..., LLM], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The message torch's CPU allocator really writes (not a copy of it) is recognised."""
    try:
        torch.empty(1 << 52, dtype=torch.uint8)
    except RuntimeError as exc:
        real = exc
    else:  # pragma: no cover - a machine that hands out 4 PiB
        pytest.skip("the allocation succeeded")
    llm = make_llm()

    def failing(scheduled: list[Any]) -> Any:
        raise real

    monkeypatch.setattr(llm.engine.runner, "_execute", failing)
    llm.engine.add_request("a", PROMPTS[1], params(1))
    with pytest.raises(DeviceOutOfMemoryError):
        llm.engine.runner.execute(llm.engine.scheduler.schedule())
    llm.engine.abort("a")


def test_other_runtime_errors_are_not_out_of_memory(
    make_llm: Callable[..., LLM], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not an out-of-memory error: no smaller step, no retry. The request fails alone (the
    device passes its probe) and the step does not raise."""
    llm = make_llm()
    error = RuntimeError("shape mismatch in a kernel")

    def failing(scheduled: list[Any]) -> Any:
        raise error

    monkeypatch.setattr(llm.engine.runner, "_execute", failing)
    recorder = StepRecorder(llm)
    llm.engine.add_request("a", PROMPTS[1], params(1))
    [output] = llm.engine.step()
    assert (output.request_id, output.finish_reason) == ("a", "error")
    assert output.error == "RuntimeError: shape mismatch in a kernel"
    assert len(recorder.steps) == 1  # not re-run: it was alone already
    assert_pool_idle(llm)


def test_a_step_raises_only_when_the_device_probe_fails_too(
    make_llm: Callable[..., LLM], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every request fails alone and the probe, a pass with no request, fails as well: the
    device is at fault, the probe's error leaves step() (the AsyncEngine counts those)."""
    llm = make_llm()
    runner = llm.engine.runner
    monkeypatch.setattr(runner, "_execute", lambda scheduled: (_ for _ in ()).throw(RuntimeError("device gone")))
    probe_error = RuntimeError("device gone (probe)")

    def failing_probe() -> None:
        raise probe_error

    monkeypatch.setattr(runner, "probe", failing_probe)
    for rid in ("a", "b"):
        llm.engine.add_request(rid, PROMPTS[1], params(1))
    with pytest.raises(RuntimeError) as info:
        llm.engine.step()
    assert info.value is probe_error and str(info.value.__cause__) == "device gone"
    for rid in ("a", "b"):
        assert llm.engine.abort(rid, FinishReason.ERROR)
    assert_pool_idle(llm)


# --- the scheduler's side of the out-of-memory back-off ------------------------------------------


def _scheduler(**kw: Any) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256),
                     CacheConfig(block_size=4), 256, **kw)


def _request(rid: str, n: int) -> Request:
    return Request(rid, list(range(1, n + 1)), SamplingParams(max_tokens=4, ignore_eos=True))


def test_shrink_halves_the_step_and_preempts_the_latest_admitted() -> None:
    sched = _scheduler()
    requests = [_request(f"r{i}", 5) for i in range(6)]
    for request in requests:
        sched.add_request(request)
    out = sched.schedule()
    assert (len(out.scheduled), out.num_batched_tokens) == (6, 30)

    preempted = sched.shrink_after_oom(out)
    assert preempted == requests[:2:-1]  # r5, r4, r3: the latest admitted first
    assert sched.running == requests[:3] and list(sched.waiting) == requests[3:]  # FCFS kept
    assert all(r.state is RequestState.QUEUED and not r.block_ids and r.num_preemptions == 1 for r in requests[3:])
    assert sched.num_preemptions == 3
    assert sched.step_limits == StepLimits(max_num_seqs=3, max_num_batched_tokens=15)

    again = sched.schedule()  # only the kept three, within the lowered limits
    assert [item.request for item in again.scheduled] == requests[:3] and again.num_batched_tokens == 15
    sched.block_manager.check_invariants(sched.running)


def test_shrink_chunks_a_single_prompt_and_gives_up_at_one_token() -> None:
    sched = _scheduler()
    sched.add_request(_request("long", 40))
    out = sched.schedule()
    assert out.num_batched_tokens == 40
    sizes = []
    while (preempted := sched.shrink_after_oom(out)) is not None:
        assert preempted == []
        out = sched.schedule()
        sizes.append(out.num_batched_tokens)
    assert sizes == [20, 10, 5, 2, 1]
    assert len(out.scheduled) == 1 and out.num_batched_tokens == 1  # nothing left to shrink
    assert sched.step_limits == StepLimits(1, 1)


def test_lowered_limits_double_back_after_successful_steps() -> None:
    sched = _scheduler(oom_recovery_steps=2)
    for i in range(8):
        sched.add_request(_request(f"r{i}", 3))
    out = sched.schedule()
    sched.shrink_after_oom(out)  # 8 requests, 24 tokens -> 4 / 12
    seen = [sched.step_limits]
    for _ in range(8):
        out = sched.schedule()
        sampled = {item.request.request_id: 7 for item in out.scheduled if item.samples}
        sched.update(out, RunnerOutput(sampled))
        if sched.step_limits != seen[-1]:
            seen.append(sched.step_limits)
    assert seen == [StepLimits(4, 12), StepLimits(8, 24), StepLimits(8, 48), StepLimits(8, 64)]


# --- transient errors -----------------------------------------------------------------------------


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The backoff waits the engine takes (they still happen)."""
    recorded: list[float] = []
    real_sleep = recovery_module.time.sleep

    def sleep(seconds: float) -> None:
        recorded.append(seconds)
        real_sleep(seconds)

    monkeypatch.setattr(recovery_module.time, "sleep", sleep)
    return recorded


def test_transient_errors_are_retried_and_change_nothing(
    make_llm: Callable[..., LLM], solo: list[Completion], sleeps: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    llm = make_llm(enable_prefix_caching=False, faults=FaultInjection(transient=3))
    recorder = StepRecorder(llm)
    with caplog.at_level(logging.WARNING, logger="rocmforge"):
        batched = llm.generate(PROMPTS, [params(i) for i in range(len(PROMPTS))])
    check_same(batched, solo)
    assert sleeps == BACKOFFS[:3]
    assert recorder.steps[0] == recorder.steps[1] == recorder.steps[3]  # the same step, run again
    retries = [r.message for r in caplog.records if "transient error" in r.message]
    assert len(retries) == 3 and "injected transient device error 1 of 3" in retries[0], retries
    assert "retry 3 of 4 in 40 ms" in retries[2]
    assert "running them one at a time" not in caplog.text
    assert_pool_idle(llm)


def test_transient_errors_beyond_the_bound_fail_the_batch(
    make_llm: Callable[..., LLM], solo: list[Completion], sleeps: list[float]
) -> None:
    """1 + K attempts of the batch, then each request alone (one attempt each): both fail,
    the device probe passes (the faults are spent), so they fail and the engine goes on."""
    llm = make_llm(enable_prefix_caching=False, faults=FaultInjection(transient=1 + K + 2))
    engine = llm.engine
    engine.add_request("a", PROMPTS[1], params(1))
    engine.add_request("b", PROMPTS[3], params(3))
    outputs = {o.request_id: o for o in engine.step()}
    assert {rid: o.finish_reason for rid, o in outputs.items()} == {"a": "error", "b": "error"}
    assert f"injected transient device error {K + 2} of {K + 3}" in (outputs["a"].error or "")
    assert sleeps == BACKOFFS
    assert_pool_idle(llm)
    # The faults are spent: the next request runs as if nothing happened.
    assert run_engine(llm, {"c": (PROMPTS[5], params(5))})["c"] == (solo[5].token_ids, "length", None)


def test_isolation_after_the_retries_fails_only_the_request_that_fails_alone(
    make_llm: Callable[..., LLM], solo: list[Completion], sleeps: list[float]
) -> None:
    llm = make_llm(enable_prefix_caching=False, faults=FaultInjection(transient=1 + K + 1))
    results = run_engine(llm, {"a": (PROMPTS[1], params(1)), "b": (PROMPTS[3], params(3))})
    tokens, reason, error = results["a"]
    assert (tokens, reason) == ([], "error") and error is not None
    assert error.startswith("DeviceError: injected transient device error")
    assert results["b"] == (solo[3].token_ids, "length", None)
    assert sleeps == BACKOFFS
    assert_pool_idle(llm)


def test_async_engine_survives_a_step_that_keeps_failing(
    make_llm: Callable[..., LLM], solo: list[Completion]
) -> None:
    llm = make_llm(enable_prefix_caching=False, faults=FaultInjection(transient=1 + K))

    async def main() -> None:
        engine = AsyncEngine.from_llm(llm)
        engine.start()
        try:
            stream = await engine.submit(PROMPTS[1], params(1), "unlucky")
            outputs = [o async for o in stream]
            assert outputs[-1].finish_reason == "error"
            assert "injected transient device error" in (outputs[-1].error or "")
            with pytest.raises(ModelExecutionError):
                await stream.result()
            assert engine.is_alive and engine.is_running
            later = await (await engine.submit(PROMPTS[2], params(2), "lucky")).result()
            assert later.token_ids == solo[2].token_ids
        finally:
            await engine.shutdown(timeout=2.0)

    asyncio.run(asyncio.wait_for(main(), ASYNC_TIMEOUT_S))
    assert_pool_idle(llm)


# --- the policy and the error taxonomy ---------------------------------------------------------------


def test_recovery_policy() -> None:
    policy = RecoveryPolicy()
    assert [policy.backoff_s(i) for i in range(6)] == [0.01, 0.02, 0.04, 0.08, 0.08, 0.08]
    assert policy.max_transient_retries == 4
    assert RecoveryPolicy(max_transient_retries=0).max_transient_retries == 0
    for bad in ({"max_transient_retries": -1}, {"max_oom_retries": 1.5}, {"initial_backoff_s": 0.2},
                {"initial_backoff_s": -0.01}):
        with pytest.raises(ConfigError):
            RecoveryPolicy(**bad)


def test_which_errors_are_transient() -> None:
    assert is_transient(DeviceError("the device hiccuped"))
    for error in (DeviceOutOfMemoryError("oom"), OutOfKVBlocksError("full"), OverloadedError("busy"),
                  ServerDrainingError("bye"), ModelExecutionError("bug"), EngineDeadError("dead"),
                  RuntimeError("torch"), ConfigError("bad")):
        assert not is_transient(error), error


def test_fault_specs_for_recovery() -> None:
    faults = FaultInjection.parse("oom_over:64, transient:3,forward_error:x")
    assert (faults.oom_over, faults.transient, faults.forward_error) == (64, 3, ("x",))
    assert faults.active and faults.affects_forward
    assert not FaultInjection.parse("gpu_init").affects_forward
    for bad in ("oom_over", "oom_over:", "oom_over:0", "oom_over:-1", "oom_over:x", "transient:1.5",
                "transient:\u00b2", "oom_over:1,oom_over:2", "transient"):
        with pytest.raises(ConfigError) as info:
            FaultInjection.parse(bad)
        assert info.value.param == "fault_inject", bad
