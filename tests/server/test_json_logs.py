"""Acceptance: JSON logs of a real server (``ROCMFORGE_LOG_FORMAT=json``, level ``debug``).

The server is started as ``rocmforge serve`` (stdout and stderr into one file), driven with a
few requests whose ids the test picks (``X-Request-Id``): a native one, a streamed one, an
OpenAI one, one cancelled by the client going away mid-stream and one invalid (4xx), then
stopped with SIGTERM. Then:

* every line the process wrote parses as a JSON object with ``ts``, ``level``, ``logger`` and
  ``message`` (the CLI's own ``serving ...`` notice included: nothing is exempt);
* every line whose message mentions one of our request ids carries ``request_id`` equal to it
  (the engine thread tags its lines explicitly, the HTTP side through the request context);
* each request has its uvicorn access line, carrying its id; so does every other access line
  (the readiness probes get generated ids).

The ids are chosen so that none contains another. Every wait is bounded.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from httpx_sse import connect_sse
from live_server import HTTP_TIMEOUT, LONG_MAX_TOKENS, assert_error_shape, stop_server
from spawned_server import spawn_server, wait_for, wait_ready

IDS = {
    "native": "jlog-native-1",
    "stream": "jlog-stream-2",
    "openai": "jlog-openai-3",
    "cancel": "jlog-cancel-4",
    "invalid": "jlog-invalid-5",
}
SHORT = {"prompt": "Hello", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
LONG = {"prompt": "Once upon a time", "max_tokens": LONG_MAX_TOKENS, "temperature": 0, "ignore_eos": True}
JSON_ENV = {"ROCMFORGE_LOG_FORMAT": "json", "ROCMFORGE_LOG_LEVEL": "debug"}


def _drive(url: str, log: Callable[[], str]) -> None:
    with httpx.Client(base_url=url, timeout=HTTP_TIMEOUT) as client:
        native = client.post("/generate", json=SHORT, headers={"X-Request-Id": IDS["native"]})
        assert native.status_code == 200 and native.json()["num_generated_tokens"] == 4, native.text

        with connect_sse(client, "POST", "/generate/stream", json=SHORT,
                         headers={"X-Request-Id": IDS["stream"]}) as src:
            events = list(src.iter_sse())
        assert events[-1].event == "done", events[-3:]

        openai = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "temperature": 0},
                             headers={"X-Request-Id": IDS["openai"]})
        assert openai.status_code == 200, openai.text

        invalid = client.post("/generate", json={"prompt": "Hi", "max_tokens": -1},
                              headers={"X-Request-Id": IDS["invalid"]})
        assert_error_shape(invalid, 400)

    # Cancelled: the client goes away mid-stream; the server notices and cancels it.
    with httpx.Client(base_url=url, timeout=httpx.Timeout(10.0, connect=5.0)) as streaming:
        with connect_sse(streaming, "POST", "/generate/stream", json=LONG,
                         headers={"X-Request-Id": IDS["cancel"]}) as src:
            for count, event in enumerate(src.iter_sse(), start=1):
                assert event.event == "delta"
                if count == 2:
                    break
    cancelled = f"request {IDS['cancel']} cancelled"
    assert wait_for(lambda: cancelled in log(), 10.0), log()


def test_json_logs_parse_and_carry_request_ids(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    server = spawn_server(tiny_gguf, tmp_path_factory.mktemp("json-logs"), env=JSON_ENV)
    try:
        wait_ready(server)
        _drive(server.url, server.log)
    finally:
        stop_server(server)
    text = server.log()
    assert server.process.returncode == 0, text

    records: list[dict] = []
    for number, line in enumerate(text.splitlines(), start=1):
        try:
            record = json.loads(line)
        except ValueError:
            pytest.fail(f"line {number} is not JSON: {line!r}\n{text}")
        assert isinstance(record, dict) and {"ts", "level", "logger", "message"} <= record.keys(), line
        records.append(record)

    messages = [r["message"] for r in records]
    for needle in ("serving tiny-server on http://127.0.0.1:", "model loaded in", "engine started",
                   "engine draining", "engine thread stopped", "server stopped"):
        assert any(needle in m for m in messages), (needle, text)
    assert all("request_id" not in r for r in records if r["message"].startswith(("engine started", "engine draining")))

    for name, rid in IDS.items():
        mentioning = [r for r in records if rid in r["message"]]
        assert mentioning or name == "invalid", (name, text)  # refused before the engine saw it
        wrong = [r for r in mentioning if r.get("request_id") != rid]
        assert not wrong, (name, wrong)
        access = [r for r in records if r["logger"] == "uvicorn.access" and r.get("request_id") == rid]
        assert len(access) == 1, (name, access)

    def engine_line(start: str) -> dict:
        [record] = [r for r in records if r["message"].startswith(start)]
        return record

    finished = engine_line(f"request {IDS['native']} finished (length)")
    assert finished["logger"] == "rocmforge.engine.async_engine" and finished["level"] == "INFO"
    assert "4 generated tokens" in finished["message"]
    assert engine_line(f"request {IDS['stream']} finished (length)")["request_id"] == IDS["stream"]
    assert engine_line(f"request {IDS['openai']} finished (length)")["request_id"] == IDS["openai"]
    assert engine_line(f"request {IDS['cancel']} admitted")["level"] == "DEBUG"
    assert engine_line(f"request {IDS['cancel']} cancelled")["level"] == "INFO"
    assert '" 400' in next(r for r in records if r["logger"] == "uvicorn.access"
                           and r.get("request_id") == IDS["invalid"])["message"]
    # Every access line carries some request id (the probes get generated ones).
    access = [r for r in records if r["logger"] == "uvicorn.access"]
    assert access and all(r.get("request_id") for r in access), access
