"""AsyncEngine: concurrency, streaming, cancel, status, failures and shutdown.

Runs a tiny random-weight llama written by :mod:`rocmforge.synthetic` on the CPU. The sync
``LLM.generate`` of a separate engine on the same file is the oracle for the tokens. Every
wait is bounded (``run`` and ``wait_until`` time out), so a bug fails the test instead of
hanging the suite.
"""

from __future__ import annotations

import asyncio
import gc
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

import pytest

from rocmforge import LLM, SamplingParams
from rocmforge.engine.async_engine import AsyncEngine
from rocmforge.engine.llm_engine import LLMEngine
from rocmforge.engine.request import RequestState
from rocmforge.engine.request_stream import RequestStream
from rocmforge.engine.scheduler import RunnerOutput, SchedulerOutput
from rocmforge.errors import (
    ContextLengthExceededError,
    EngineDeadError,
    InvalidRequestError,
    ModelExecutionError,
    OverloadedError,
    RequestNotFoundError,
)
from rocmforge.synthetic import SyntheticSpec, random_hf_weights, write_gguf

T = TypeVar("T")

PROMPTS = [
    "The quick brown fox",
    "Once upon a time, in a small village,",
    "It was the best of times",
    "def add(a, b):",
    "1, 2, 3, 4,",
    "The capital of France is",
    "Hello, world!",
    "there lived a curious cat.",
    "Caf\u00e9 na\u00efve Z\u00fcrich",
    "jumps over the lazy dog. Once upon a time, in a small village, there lived a curious cat.",
    "return a + b",
    "it was the worst of times.",
]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
LONG = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)


def run(coro: Coroutine[Any, Any, T], timeout: float = 20.0) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.002)


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = SyntheticSpec()
    path = tmp_path_factory.mktemp("async_engine") / "tiny-llama.gguf"
    write_gguf(path, spec, random_hf_weights(spec, seed=0))
    return path


@pytest.fixture(scope="module")
def ref_llm(gguf_path: Path) -> LLM:
    return LLM(gguf_path, device="cpu", dtype="float32", weight_format="dense")


@pytest.fixture
def make_llm(gguf_path: Path) -> Callable[..., LLM]:
    def make(**kwargs: Any) -> LLM:
        return LLM(gguf_path, device="cpu", dtype="float32", weight_format="dense", **kwargs)

    return make


@asynccontextmanager
async def serving(llm: LLM, **kwargs: Any) -> AsyncIterator[AsyncEngine]:
    engine = AsyncEngine.from_llm(llm, **kwargs)
    engine.start()
    try:
        yield engine
    finally:
        await engine.shutdown(timeout=2.0)


@asynccontextmanager
async def paused(engine: AsyncEngine) -> AsyncIterator[None]:
    """Hold the engine thread between two steps; commands posted meanwhile are handled
    together when the block ends, so they share the next step."""
    entered, gate = threading.Event(), threading.Event()

    def hold(_: LLMEngine) -> None:
        entered.set()
        gate.wait(5.0)

    blocker = asyncio.create_task(engine.call(hold))
    await wait_until(entered.is_set)
    try:
        yield
        await asyncio.sleep(0)  # let tasks created in the block post their commands
    finally:
        gate.set()
        await blocker


def free_blocks(engine: LLMEngine) -> tuple[int, int]:
    bm = engine.scheduler.block_manager
    return bm.num_free_blocks, bm.num_blocks


def tokens(llm: LLM, text: str) -> list[int]:
    return llm.tokenize(text)


# --- results and streaming ---------------------------------------------------------------------


def test_concurrent_submits_match_generate(ref_llm: LLM, make_llm: Callable[..., LLM]) -> None:
    prompts = [tokens(ref_llm, p) for p in PROMPTS]
    params = [SamplingParams(max_tokens=6 + i, temperature=0.0) for i in range(len(prompts))]
    expected = ref_llm.generate(prompts, params)

    async def main() -> None:
        async with serving(make_llm()) as engine:
            streams = await asyncio.gather(*(engine.submit(p, sp) for p, sp in zip(prompts, params)))
            assert len({s.request_id for s in streams}) == len(streams)
            results = await asyncio.gather(*(s.result() for s in streams))
            for got, want in zip(results, expected):
                assert got.token_ids == want.token_ids
                assert got.text == want.text
                assert got.finish_reason == want.finish_reason
                assert got.prompt_token_ids == want.prompt_token_ids
            free, total = await engine.call(free_blocks)
            assert free == total
            assert engine.num_running == 0 and engine.num_waiting == 0 and engine.kv_cache_usage == 0.0

    run(main())


def test_stream_deltas_concatenate_to_final_text(ref_llm: LLM, make_llm: Callable[..., LLM]) -> None:
    prompt = tokens(ref_llm, PROMPTS[1])
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=2)
    [want] = ref_llm.generate([prompt], params)

    async def main() -> None:
        async with serving(make_llm()) as engine:
            stream = await engine.submit(prompt, params, request_id="stream-1")
            assert stream.request_id == "stream-1"
            outputs = [out async for out in stream]
            assert stream.finished
            assert [o.finished for o in outputs] == [False] * (len(outputs) - 1) + [True]
            assert all(len(o.new_token_ids) == 1 for o in outputs)
            assert [o.num_output_tokens for o in outputs] == list(range(1, len(outputs) + 1))
            assert "".join(o.delta_text for o in outputs) == outputs[-1].text == want.text
            assert [t for o in outputs for t in o.new_token_ids] == want.token_ids
            completion = await stream.result()  # after full iteration: the recorded outputs
            assert completion.text == want.text and completion.finish_reason == "length"
            assert completion.logprobs is not None and len(completion.logprobs) == 24

    run(main())


# --- cancel --------------------------------------------------------------------------------------


def test_cancel_mid_stream_frees_blocks_at_once(ref_llm: LLM, make_llm: Callable[..., LLM]) -> None:
    async def main() -> None:
        async with serving(make_llm()) as engine:
            victim = await engine.submit(tokens(ref_llm, PROMPTS[0]), LONG)
            other = await engine.submit(tokens(ref_llm, PROMPTS[1]), LONG)
            seen = [await victim.__anext__() for _ in range(3)]
            assert await engine.cancel(victim.request_id) is True

            def check(e: LLMEngine) -> tuple[bool, int, int]:
                live = [e.scheduler.get_request(other.request_id)]
                e.scheduler.block_manager.check_invariants(live)
                held = len(live[0].block_ids)
                free, total = free_blocks(e)
                return e.scheduler.is_live(victim.request_id), free + held, total

            victim_live, free_plus_other, total = await engine.call(check)
            assert not victim_live and free_plus_other == total

            rest = [out async for out in victim]
            final = rest[-1]
            assert final.finished and final.finish_reason == "cancelled" and final.new_token_ids == []
            assert all(not o.finished for o in rest[:-1])
            assert "".join(o.delta_text for o in seen + rest) == final.text
            assert final.num_output_tokens == sum(len(o.new_token_ids) for o in seen + rest)

            assert await engine.cancel(victim.request_id) is False  # idempotent
            status = engine.status(victim.request_id)
            assert status.state is RequestState.FINISHED and status.finish_reason == "cancelled"
            assert (await victim.result()).finish_reason == "cancelled"

            assert await other.cancel() is True
            assert (await other.result()).finish_reason == "cancelled"
            free, total = await engine.call(free_blocks)
            assert free == total

    run(main())


def test_unknown_ids_and_finished_cancel(ref_llm: LLM, make_llm: Callable[..., LLM]) -> None:
    async def main() -> None:
        async with serving(make_llm()) as engine:
            with pytest.raises(RequestNotFoundError):
                await engine.cancel("no-such-request")
            with pytest.raises(RequestNotFoundError):
                engine.status("no-such-request")
            stream = await engine.submit(tokens(ref_llm, PROMPTS[2]), GREEDY)
            await stream.result()
            assert await engine.cancel(stream.request_id) is False
            assert engine.status(stream.request_id).finish_reason == "length"

    run(main())


def test_closing_the_stream_cancels_the_request(ref_llm: LLM, make_llm: Callable[..., LLM]) -> None:
    prompt = tokens(ref_llm, PROMPTS[3])

    async def main() -> None:
        async with serving(make_llm()) as engine:

            def finished(rid: str) -> Callable[[], bool]:
                return lambda: engine.status(rid).state is RequestState.FINISHED

            # 1. `async with` exit (aclose) cancels, and waits for the cancel.
            async with await engine.submit(prompt, LONG) as stream:
                async for out in stream:
                    if out.num_output_tokens == 2:
                        break
            assert engine.status(stream.request_id).finish_reason == "cancelled"
            assert [o async for o in stream] == []  # closed: iteration ends

            # 2. The task awaiting the next output is cancelled.
            stream = await engine.submit(prompt, LONG)
            got: list[object] = []

            async def consume(s: RequestStream) -> None:
                async for out in s:
                    got.append(out)

            task = asyncio.create_task(consume(stream))
            await wait_until(lambda: len(got) >= 2)
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
            await wait_until(finished(stream.request_id))
            assert engine.status(stream.request_id).finish_reason == "cancelled"

            # 3. The stream is dropped (garbage collected) before its end.
            stream = await engine.submit(prompt, LONG)
            rid = stream.request_id
            await stream.__anext__()
            del stream
            gc.collect()
            await wait_until(finished(rid))
            assert engine.status(rid).finish_reason == "cancelled"

            free, total = await engine.call(free_blocks)
            assert free == total

    run(main())


# --- status and admission ---------------------------------------------------------------------------


def test_status_through_a_requests_life(ref_llm: LLM, make_llm: Callable[..., LLM]) -> None:
    async def main() -> None:
        async with serving(make_llm(max_num_seqs=1, max_num_batched_tokens=64)) as engine:
            first = await engine.submit(tokens(ref_llm, PROMPTS[0]), LONG)
            await first.__anext__()
            second = await engine.submit(tokens(ref_llm, PROMPTS[1]), GREEDY)
            third = await engine.submit(tokens(ref_llm, PROMPTS[2]), GREEDY)

            running = engine.status(first.request_id)
            assert running.state is RequestState.DECODE and running.queue_position is None
            assert running.num_output_tokens >= 1 and running.first_token_time is not None
            queued = [engine.status(s.request_id) for s in (second, third)]
            assert [s.state for s in queued] == [RequestState.QUEUED] * 2
            assert [s.queue_position for s in queued] == [0, 1]
            assert queued[0].first_scheduled_time is None and queued[0].num_output_tokens == 0
            assert queued[0].num_prompt_tokens == len(tokens(ref_llm, PROMPTS[1]))
            assert engine.num_running == 1 and engine.num_waiting == 2

            await first.cancel()
            done = await second.result()
            status = engine.status(second.request_id)
            assert status.state is RequestState.FINISHED and status.finish_reason == "length"
            assert status.num_output_tokens == len(done.token_ids) == GREEDY.max_tokens
            assert status.queue_position is None
            times = [status.arrival_time, status.first_scheduled_time, status.first_token_time, status.finished_time]
            assert None not in times and times == sorted(times)  # type: ignore[type-var]
            assert engine.status(first.request_id).finish_reason == "cancelled"
            await third.result()
            assert engine.status(third.request_id).finish_reason == "length"

    run(main())


def test_admission_errors_are_raised_by_submit(ref_llm: LLM, make_llm: Callable[..., LLM]) -> None:
    llm = make_llm(max_num_seqs=1, max_num_batched_tokens=64, max_waiting=1)
    prompt = tokens(ref_llm, PROMPTS[0])

    async def main() -> None:
        async with serving(llm) as engine:
            with pytest.raises(ContextLengthExceededError):
                await engine.submit(prompt, SamplingParams(max_tokens=engine.max_model_len))
            with pytest.raises(InvalidRequestError):
                await engine.submit([0, 10_000], GREEDY)
            with pytest.raises(InvalidRequestError):
                await engine.submit([], GREEDY)
            with pytest.raises(InvalidRequestError):
                await engine.submit("text", GREEDY)  # type: ignore[arg-type]
            with pytest.raises(InvalidRequestError):
                await engine.submit(prompt, {"max_tokens": 3})  # type: ignore[arg-type]
            with pytest.raises(InvalidRequestError, match="stop_token_ids"):  # outside the vocabulary
                await engine.submit(prompt, SamplingParams(max_tokens=4, min_tokens=1, stop_token_ids=[10_000]))

            running = await engine.submit(prompt, LONG, request_id="dup")
            await running.__anext__()
            with pytest.raises(InvalidRequestError):
                await engine.submit(prompt, GREEDY, request_id="dup")
            waiting = await engine.submit(prompt, GREEDY)
            with pytest.raises(OverloadedError):
                await engine.submit(prompt, GREEDY)
            await running.cancel()
            assert (await waiting.result()).finish_reason == "length"
            # A finished id may be used again.
            again = await engine.submit(prompt, GREEDY, request_id="dup")
            assert (await again.result()).finish_reason == "length"

    run(main())


# --- failures --------------------------------------------------------------------------------------


def test_a_step_the_device_fails_fails_only_its_batch(
    ref_llm: LLM, make_llm: Callable[..., LLM], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The device fails one step — the batch, each request alone and the probe with no
    request: the step's requests fail, the waiting one and later ones are served."""
    llm = make_llm(max_num_seqs=2, max_num_batched_tokens=64)
    prompts = [tokens(ref_llm, p) for p in PROMPTS[:5]]
    expected = ref_llm.generate(prompts, GREEDY)
    runner = llm.engine.runner
    execute, probe = runner.execute, runner.probe
    failed_batches: list[list[str]] = []
    broken = {"passes": 3, "probes": 1}  # the batch, then each of its two requests alone

    def faulty(out: SchedulerOutput) -> RunnerOutput:
        if broken["passes"]:
            broken["passes"] -= 1
            failed_batches.append([item.request.request_id for item in out.scheduled])
            raise RuntimeError("injected fault")
        return execute(out)

    def faulty_probe() -> None:
        if broken["probes"]:
            broken["probes"] -= 1
            raise RuntimeError("injected fault (probe)")
        probe()

    monkeypatch.setattr(runner, "execute", faulty)
    monkeypatch.setattr(runner, "probe", faulty_probe)

    async def main() -> None:
        async with serving(llm) as engine:
            async with paused(engine):
                tasks = [asyncio.create_task(engine.submit(p, GREEDY)) for p in prompts[:3]]
            streams = await asyncio.gather(*tasks)
            finals = []
            for stream in streams[:2]:
                finals.append([o async for o in stream][-1])
            batch, *alone = failed_batches
            assert batch == [s.request_id for s in streams[:2]]  # the third one waited
            assert alone == [[s.request_id] for s in streams[:2]]

            for stream, final in zip(streams[:2], finals):
                assert final.finish_reason == "error" and "injected fault" in (final.error or "")
                status = engine.status(stream.request_id)
                assert status.finish_reason == "error" and "injected fault" in (status.error or "")
                with pytest.raises(ModelExecutionError):
                    await stream.result()
            assert (await streams[2].result()).token_ids == expected[2].token_ids

            later = [await engine.submit(p, GREEDY) for p in prompts[3:]]
            for stream, want in zip(later, expected[3:]):
                assert (await stream.result()).token_ids == want.token_ids
            assert engine.is_alive and engine.is_running
            free, total = await engine.call(free_blocks)
            assert free == total

    run(main())


def test_bad_requests_in_a_row_never_kill_the_engine(
    ref_llm: LLM, make_llm: Callable[..., LLM], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request whose data makes every pass it is in fail (alone too) fails alone: many of
    them in a row — more than max_consecutive_failures — leave the engine alive, and the good
    requests batched with them get exactly their tokens."""
    llm = make_llm(max_num_seqs=2, max_num_batched_tokens=64)
    prompt = tokens(ref_llm, PROMPTS[0])
    [want] = ref_llm.generate([prompt], GREEDY)
    runner = llm.engine.runner
    execute = runner.execute

    def poisoned(out: SchedulerOutput) -> RunnerOutput:
        if any(item.request.request_id.startswith("bad") for item in out.scheduled):
            raise OverflowError("Overflow when unpacking long long")
        return execute(out)

    monkeypatch.setattr(runner, "execute", poisoned)

    async def main() -> None:
        async with serving(llm, max_consecutive_failures=3) as engine:
            for i in range(6):  # alone: each is a step whose only request fails
                stream = await engine.submit(prompt, GREEDY, request_id=f"bad-{i}")
                with pytest.raises(ModelExecutionError, match="OverflowError"):
                    await stream.result()
            good = await engine.submit(prompt, GREEDY, request_id="good")
            bad = await engine.submit(prompt, GREEDY, request_id="bad-batched")
            assert (await good.result()).token_ids == want.token_ids
            with pytest.raises(ModelExecutionError):
                await bad.result()
            assert engine.is_alive and engine.is_running
            free, total = await engine.call(free_blocks)
            assert free == total

    run(main())


def test_fatal_error_kills_the_engine(
    ref_llm: LLM, make_llm: Callable[..., LLM], monkeypatch: pytest.MonkeyPatch
) -> None:
    llm = make_llm(max_num_seqs=2, max_num_batched_tokens=64)
    execute = llm.engine.runner.execute
    calls = {"n": 0}

    def dying(out: SchedulerOutput) -> RunnerOutput:
        calls["n"] += 1
        if calls["n"] > 3:
            raise EngineDeadError("the device is gone")
        return execute(out)

    monkeypatch.setattr(llm.engine.runner, "execute", dying)
    prompts = [tokens(ref_llm, p) for p in PROMPTS[:3]]

    async def main() -> None:
        async with serving(llm) as engine:
            async with paused(engine):
                tasks = [asyncio.create_task(engine.submit(p, LONG)) for p in prompts]
            streams = await asyncio.gather(*tasks)
            for stream in streams:  # two running, one still queued: all end with an error
                outputs = [o async for o in stream]
                assert outputs[-1].finished and outputs[-1].finish_reason == "error"
                assert "the device is gone" in (outputs[-1].error or "")
                with pytest.raises(EngineDeadError):
                    await stream.result()
                assert engine.status(stream.request_id).finish_reason == "error"
            assert not engine.is_alive and not engine.is_running
            assert "the device is gone" in (engine.dead_reason or "")
            with pytest.raises(EngineDeadError):
                await engine.submit(prompts[0], GREEDY)
            with pytest.raises(EngineDeadError):
                await engine.call(free_blocks)
            assert await engine.cancel(streams[0].request_id) is False
            with pytest.raises(RequestNotFoundError):
                await engine.cancel("no-such-request")
        free, total = free_blocks(llm.engine)  # the thread has stopped: safe to read here
        assert free == total

    run(main())


# --- shutdown --------------------------------------------------------------------------------------


def test_shutdown_lets_in_flight_requests_finish(ref_llm: LLM, make_llm: Callable[..., LLM]) -> None:
    prompts = [tokens(ref_llm, p) for p in PROMPTS[:4]]
    expected = ref_llm.generate(prompts, GREEDY)

    async def main() -> None:
        engine = AsyncEngine.from_llm(make_llm(max_num_seqs=2, max_num_batched_tokens=64))
        streams = [await engine.submit(p, GREEDY) for p in prompts]  # the first submit starts it
        assert engine.is_running
        await engine.shutdown(timeout=10.0)
        assert not engine.is_running and engine.is_alive
        for stream, want in zip(streams, expected):
            assert (await stream.result()).token_ids == want.token_ids
        with pytest.raises(EngineDeadError):
            await engine.submit(prompts[0], GREEDY)
        await engine.shutdown(timeout=1.0)  # idempotent

    run(main())


def test_shutdown_deadline_cancels_the_rest(ref_llm: LLM, make_llm: Callable[..., LLM]) -> None:
    llm = make_llm()

    async def main() -> None:
        engine = AsyncEngine.from_llm(llm)
        streams = [await engine.submit(tokens(ref_llm, p), LONG) for p in PROMPTS[:3]]
        await streams[0].__anext__()
        await engine.shutdown(timeout=0.05)
        for stream in streams:
            completion = await stream.result()
            assert completion.finish_reason == "cancelled"
            assert len(completion.token_ids) < LONG.max_tokens
        assert not engine.is_running

    run(main())
    free, total = free_blocks(llm.engine)
    assert free == total
