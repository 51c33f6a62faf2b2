"""The engine thread's log lines: a request's lifecycle (admitted, refused, finished, cancelled,
failed) is logged on its behalf, with ``request_id`` on the record (the HTTP request context
does not reach the engine thread); engine state changes (started, draining, stopped) carry
none. In-process on the tiny model; every wait is bounded."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pytest

from rocmforge import LLM, SamplingParams
from rocmforge.engine.async_engine import AsyncEngine
from rocmforge.errors import ContextLengthExceededError, ModelExecutionError
from rocmforge.logs import RequestContextFilter, bind_request
from rocmforge.testing.fault_spec import FaultInjection

IDS = ("log-done", "log-cancel", "log-fail", "log-refused")
SHORT = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
LONG = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)


def test_lifecycle_lines_carry_the_request_id(make_llm: Callable[..., LLM], caplog: pytest.LogCaptureFixture) -> None:
    llm = make_llm(faults=FaultInjection(forward_error=("log-fail",)))
    prompt = llm.tokenize("Hello there", add_special=True)

    async def main() -> None:
        engine = AsyncEngine.from_llm(llm)
        with bind_request("the-caller"):  # the caller's context must not leak into engine lines
            engine.start()
        try:
            done = await (await engine.submit(prompt, SHORT, "log-done")).result()
            assert done.finish_reason == "length"
            stream = await engine.submit(prompt, LONG, "log-cancel")
            await asyncio.wait_for(stream.__anext__(), 10.0)
            assert await engine.cancel("log-cancel")
            with pytest.raises(ModelExecutionError):
                await (await engine.submit(prompt, SHORT, "log-fail")).result()
            with pytest.raises(ContextLengthExceededError):
                await engine.submit(prompt, SamplingParams(max_tokens=100_000), "log-refused")
        finally:
            await engine.shutdown(timeout=2.0)

    # As on the server's handlers: the bound context's ids are copied onto every record.
    caplog.handler.addFilter(RequestContextFilter())
    with caplog.at_level(logging.DEBUG, logger="rocmforge"):
        asyncio.run(asyncio.wait_for(main(), 30.0))

    engine_records = [r for r in caplog.records if r.name.startswith("rocmforge.engine")]
    for rid in IDS:
        mentioning = [r for r in engine_records if rid in r.getMessage()]
        assert mentioning, rid
        for record in mentioning:
            assert getattr(record, "request_id", None) == rid, (rid, record.getMessage())

    def line(rid: str, start: str) -> logging.LogRecord:
        found = [r for r in engine_records if r.getMessage().startswith(start) and r.request_id == rid]
        assert len(found) == 1, (rid, start, [r.getMessage() for r in engine_records])
        return found[0]

    assert line("log-done", "request log-done admitted").levelno == logging.DEBUG
    finished = line("log-done", "request log-done finished (length)")
    assert finished.levelno == logging.INFO and "5 generated tokens" in finished.getMessage()
    assert line("log-cancel", "request log-cancel cancelled").levelno == logging.INFO
    failed = line("log-fail", "request log-fail failed")
    assert failed.levelno == logging.WARNING and "injected forward fault" in failed.getMessage()
    assert line("log-refused", "request log-refused refused").levelno == logging.DEBUG

    for start in ("engine started", "engine draining", "engine thread stopped"):
        [record] = [r for r in engine_records if r.getMessage().startswith(start)]
        assert getattr(record, "request_id", None) is None, record.getMessage()
