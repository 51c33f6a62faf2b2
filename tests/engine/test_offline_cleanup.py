"""The offline API cleans up after itself, and finished requests are not kept alive.

* ``LLM.generate`` validates every prompt before queueing any: a call with one prompt too long
  for the context raises and leaves nothing behind (before, the first prompt stayed in the
  scheduler and every later call raised ``KeyError('llm-0')``);
* a call that fails or is interrupted mid-way (an exception from the engine, Ctrl-C, an
  abandoned ``stream``) aborts exactly its own requests;
* nothing holds a finished request (with its token lists) once its final output is out: the
  scheduler forgets it after the step that finished it.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable

import pytest
from tiny_engine import TINY_SPEC, assert_pool_idle

from rocmforge import LLM, SamplingParams
from rocmforge.engine.async_engine import AsyncEngine
from rocmforge.engine.request import Request
from rocmforge.errors import ContextLengthExceededError, InvalidRequestError

GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


def test_a_call_with_one_bad_prompt_queues_nothing(make_llm: Callable[..., LLM]) -> None:
    llm = make_llm()
    too_long = [5] * (TINY_SPEC.max_context + 1)
    with pytest.raises(ContextLengthExceededError):
        llm.generate(["ok", too_long], GREEDY)
    assert not llm.engine.has_unfinished()
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        llm.generate([[1, 2], [TINY_SPEC.vocab_size]], GREEDY)
    with pytest.raises(InvalidRequestError, match="stop_token_ids"):
        llm.generate("ok", SamplingParams(max_tokens=4, min_tokens=1, stop_token_ids=[10**6]))
    assert not llm.engine.has_unfinished()
    [later] = llm.generate("ok", GREEDY)  # the next call works
    assert len(later.token_ids) == 4
    assert_pool_idle(llm)


def test_an_interrupted_call_aborts_its_own_requests(make_llm: Callable[..., LLM],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    llm = make_llm()
    step = llm.engine.step
    calls = {"n": 0}

    def interrupted() -> list:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return step()

    monkeypatch.setattr(llm.engine, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(["one", "two", "three"], SamplingParams(max_tokens=50, ignore_eos=True))
    assert not llm.engine.has_unfinished()
    assert_pool_idle(llm)
    monkeypatch.setattr(llm.engine, "step", step)
    assert len(llm.generate("again", GREEDY)[0].token_ids) == 4


def test_an_abandoned_stream_aborts_only_its_request(make_llm: Callable[..., LLM]) -> None:
    llm = make_llm()
    stream = llm.stream("Hello", SamplingParams(max_tokens=50, ignore_eos=True))
    first = next(stream)
    assert not first.finished and llm.engine.has_unfinished()
    stream.close()  # the caller walks away
    assert not llm.engine.has_unfinished()
    assert_pool_idle(llm)


def test_finished_requests_are_not_kept_alive(make_llm: Callable[..., LLM]) -> None:
    """Run requests through the async engine (as the server does); once their final outputs
    are out, no object keeps the scheduler's Request (and its token lists) alive; their small
    statuses stay queryable."""
    llm = make_llm()
    assert _live_requests() == 0

    async def main() -> None:
        engine = AsyncEngine.from_llm(llm)
        engine.start()
        try:
            for i in range(5):
                stream = await engine.submit([5, 6, 7], SamplingParams(max_tokens=20, ignore_eos=True),
                                             request_id=f"r{i}")
                assert await engine.call(lambda e, rid=f"r{i}": e.is_live(rid))
                await stream.result()
                del stream
            for i in range(5):
                status = engine.status(f"r{i}")
                assert status.finish_reason == "length" and status.num_output_tokens == 20
        finally:
            await engine.shutdown(timeout=2.0)

    asyncio.run(asyncio.wait_for(main(), 30.0))
    assert _live_requests() == 0


def _live_requests() -> int:
    gc.collect()
    return sum(type(obj) is Request for obj in gc.get_objects())
