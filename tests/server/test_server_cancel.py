"""Cancelling and abandoning requests on a real server: the request ends ``cancelled``, its KV
blocks are freed and nothing is left running."""

from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlsplit

import httpx
import pytest
from httpx_sse import connect_sse
from live_server import LONG_MAX_TOKENS, Server, wait_for_status, wait_until_idle

LONG = {"prompt": "Once upon a time", "max_tokens": LONG_MAX_TOKENS, "temperature": 0, "ignore_eos": True}
CHAT_LONG = {"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": LONG_MAX_TOKENS,
             "temperature": 0, "ignore_eos": True}


def _finished(body: dict) -> bool:
    return body.get("state") == "finished"


def _assert_cancelled_and_idle(client: httpx.Client, request_id: str) -> dict:
    status = wait_for_status(client, request_id, _finished, timeout=3.0)
    assert status.get("state") == "finished", status
    assert status["finish_reason"] == "cancelled", status
    assert 0 < status["num_generated_tokens"] < LONG_MAX_TOKENS, status
    values = wait_until_idle(client, timeout=3.0)
    assert values["rocmforge_requests_running"] == 0, values
    assert values["rocmforge_requests_waiting"] == 0, values
    assert values["rocmforge_kv_cache_usage_ratio"] == 0, values
    return status


def _wait_running(client: httpx.Client, request_id: str) -> dict:
    status = wait_for_status(client, request_id, lambda b: b.get("num_generated_tokens", 0) > 0, timeout=10.0)
    assert status.get("state") == "decode", status
    return status


def test_cancel_mid_stream(client: httpx.Client, base_url: str) -> None:
    request_id = "cancel-mid-stream"
    events = []
    with httpx.Client(base_url=base_url, timeout=httpx.Timeout(10.0, connect=5.0)) as other:
        with connect_sse(client, "POST", "/generate/stream", json=LONG, headers={"X-Request-Id": request_id}) as src:
            assert src.response.status_code == 200
            for event in src.iter_sse():
                events.append(event)
                if len(events) == 3:
                    first = other.post(f"/cancel/{request_id}")
                    assert first.status_code == 200, first.text
                    assert first.json()["cancelled"] is True
                    assert first.json()["finish_reason"] == "cancelled"
                    again = other.post(f"/cancel/{request_id}")  # idempotent
                    assert again.status_code == 200, again.text
                    assert again.json()["cancelled"] is False
                    assert again.json()["state"] == "finished"
                assert len(events) <= LONG_MAX_TOKENS, "the stream did not end after the cancel"
    assert [e.event for e in events[:3]] == ["delta"] * 3
    done = events[-1]
    assert done.event == "done", events[-3:]
    body = done.json()
    assert body["request_id"] == request_id
    assert body["finish_reason"] == "cancelled"
    assert 3 <= body["usage"]["completion_tokens"] < LONG_MAX_TOKENS
    status = _assert_cancelled_and_idle(client, request_id)
    assert status["num_generated_tokens"] == body["usage"]["completion_tokens"]


def test_cancel_openai_stream_from_outside(client: httpx.Client, base_url: str) -> None:
    request_id = "cancel-openai-stream"
    chunks = []
    with client.stream("POST", "/v1/chat/completions", json={**CHAT_LONG, "stream": True},
                       headers={"X-Request-Id": request_id}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            chunks.append(line[6:])
            if len(chunks) == 3:
                assert client.post(f"/cancel/{request_id}").json()["cancelled"] is True
            assert len(chunks) <= LONG_MAX_TOKENS + 3
    assert chunks[-1] == "[DONE]"
    last = json.loads(chunks[-2])
    assert last["choices"][0]["finish_reason"] == "stop"  # OpenAI has no "cancelled": it reads as stop
    _assert_cancelled_and_idle(client, request_id)


def test_client_disconnect_mid_stream(client: httpx.Client, base_url: str) -> None:
    request_id = "disconnect-stream"
    with httpx.Client(base_url=base_url, timeout=httpx.Timeout(10.0, connect=5.0)) as streaming:
        with connect_sse(streaming, "POST", "/generate/stream", json=LONG,
                         headers={"X-Request-Id": request_id}) as src:
            for count, event in enumerate(src.iter_sse(), start=1):
                assert event.event == "delta"
                if count == 3:
                    break
        # Leaving the block closed the response; closing the client drops the connection.
    _assert_cancelled_and_idle(client, request_id)


@pytest.mark.parametrize("path,body", [("/v1/completions", {**LONG, "stream": True}),
                                       ("/v1/chat/completions", {**CHAT_LONG, "stream": True})],
                         ids=["completions", "chat"])
def test_client_disconnect_mid_openai_stream(client: httpx.Client, base_url: str, path: str, body: dict) -> None:
    request_id = f"disconnect-stream-{path.strip('/').replace('/', '-')}"
    with httpx.Client(base_url=base_url, timeout=httpx.Timeout(10.0, connect=5.0)) as streaming:
        with streaming.stream("POST", path, json=body, headers={"X-Request-Id": request_id}) as response:
            assert response.status_code == 200
            for count, _ in enumerate(response.iter_lines(), start=1):
                if count == 6:
                    break
    _assert_cancelled_and_idle(client, request_id)


def test_client_gives_up_on_a_non_streamed_request(client: httpx.Client, base_url: str) -> None:
    request_id = "disconnect-plain"
    impatient = httpx.Timeout(connect=5.0, read=0.5, write=5.0, pool=5.0)
    with httpx.Client(base_url=base_url, timeout=impatient) as quitter:
        with pytest.raises(httpx.ReadTimeout):
            quitter.post("/generate", json=LONG, headers={"X-Request-Id": request_id})
    # The server notices the closed connection and cancels the request mid-generation.
    _assert_cancelled_and_idle(client, request_id)


@pytest.mark.parametrize("path,body,engine_ids", [
    ("/generate", LONG, [""]),
    ("/v1/completions", LONG, [""]),
    ("/v1/completions", {**LONG, "n": 2}, ["-0", "-1"]),  # n choices: one engine request each
    ("/v1/chat/completions", CHAT_LONG, [""]),
], ids=["generate", "completions", "completions-n2", "chat"])
def test_raw_socket_closed_before_the_answer(client: httpx.Client, base_url: str, path: str, body: dict,
                                             engine_ids: list[str]) -> None:
    request_id = f"disconnect-raw-{path.strip('/').replace('/', '-')}-{len(engine_ids)}"
    url = urlsplit(base_url)
    payload = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\nX-Request-Id: {request_id}\r\n\r\n").encode()
    with socket.create_connection((url.hostname, url.port), timeout=5.0) as sock:
        sock.sendall(head + payload)
        for suffix in engine_ids:
            _wait_running(client, request_id + suffix)
        time.sleep(0.2)
    for suffix in engine_ids:
        _assert_cancelled_and_idle(client, request_id + suffix)


def test_disconnects_log_no_errors(server: Server) -> None:
    """Runs last in this module: a client that goes away is routine, not a server error."""
    log = server.log()
    assert "Traceback" not in log and "ERROR" not in log, log
