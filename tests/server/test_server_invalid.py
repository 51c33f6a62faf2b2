"""A table of invalid requests against a real server: each is answered 4xx with the one error
shape and a request id, never 5xx, and the engine keeps serving afterwards."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from live_server import TINY_SPEC, Server, assert_error_shape, metric_values

CHAT = [{"role": "user", "content": "Hi"}]
CONTEXT = TINY_SPEC.max_context


@dataclass(frozen=True)
class Case:
    id: str
    path: str
    body: Any = None
    """JSON-encoded with ``json=`` unless ``raw`` is given."""
    method: str = "POST"
    raw: bytes | None = None
    """Sent verbatim (bad JSON, NaN literals, ...) with ``content_type``."""
    content_type: str = "application/json"
    status: int = 400
    code: str | None = "invalid_request"
    param: str | None = None
    """Expected ``param`` (checked when given)."""
    headers: dict[str, str] = field(default_factory=dict)


def gen(**fields: Any) -> dict:
    return {"prompt": "Hello", "max_tokens": 4, **fields}


def cmpl(**fields: Any) -> dict:
    return {"model": "tiny-server", "prompt": "Hello", "max_tokens": 4, **fields}


def chat(**fields: Any) -> dict:
    return {"model": "tiny-server", "messages": CHAT, "max_tokens": 4, **fields}


CASES = [
    # --- wrong types ---------------------------------------------------------------------------
    Case("gen-prompt-number", "/generate", {"prompt": 42}, param="prompt"),
    Case("gen-prompt-object", "/generate", {"prompt": {"text": "Hi"}}, param="prompt"),
    Case("gen-prompt-null", "/generate", {"prompt": None}, param="prompt"),
    Case("gen-prompt-missing", "/generate", {"max_tokens": 4}, param="prompt"),
    Case("gen-max-tokens-string", "/generate", gen(max_tokens="4"), param="max_tokens"),
    Case("gen-max-tokens-float", "/generate", gen(max_tokens=4.0), param="max_tokens"),
    Case("gen-max-tokens-bool", "/generate", gen(max_tokens=True), param="max_tokens"),
    Case("gen-temperature-string", "/generate", gen(temperature="hot"), param="temperature"),
    Case("gen-stop-number", "/generate", gen(stop=7), param="stop"),
    Case("gen-temperature-bool", "/generate", gen(temperature=True), param="temperature"),
    Case("gen-ignore-eos-string", "/generate", gen(ignore_eos="yes"), param="ignore_eos"),
    Case("gen-seed-float", "/generate", gen(seed=1.5), param="seed"),
    Case("cmpl-prompt-number", "/v1/completions", cmpl(prompt=42), param="prompt"),
    Case("cmpl-prompt-object", "/v1/completions", cmpl(prompt={"a": 1}), param="prompt"),
    Case("cmpl-max-tokens-string", "/v1/completions", cmpl(max_tokens="16"), param="max_tokens"),
    Case("cmpl-max-tokens-float", "/v1/completions", cmpl(max_tokens=1.5), param="max_tokens"),
    Case("cmpl-n-string", "/v1/completions", cmpl(n="2"), param="n"),
    Case("cmpl-stream-string", "/v1/completions", cmpl(stream="yes"), param="stream"),
    Case("chat-temperature-string", "/v1/chat/completions", chat(temperature="0.5"), param="temperature"),
    Case("chat-messages-string", "/v1/chat/completions", chat(messages="Hi"), param="messages"),
    Case("tokenize-prompt-number", "/tokenize", {"prompt": 3}, param="prompt"),
    Case("detokenize-tokens-strings", "/detokenize", {"tokens": ["a"]}, param="tokens.0"),
    # --- out of range ----------------------------------------------------------------------------
    Case("gen-max-tokens-0", "/generate", gen(max_tokens=0), param="max_tokens"),
    Case("gen-max-tokens-negative", "/generate", gen(max_tokens=-1), param="max_tokens"),
    Case("gen-temperature-negative", "/generate", gen(temperature=-1), param="temperature"),
    Case("gen-top-p-0", "/generate", gen(top_p=0), param="top_p"),
    Case("gen-top-p-1.5", "/generate", gen(top_p=1.5), param="top_p"),
    Case("gen-top-k-negative", "/generate", gen(top_k=-5), param="top_k"),
    Case("gen-min-p-2", "/generate", gen(min_p=2), param="min_p"),
    Case("gen-logprobs-21", "/generate", gen(logprobs=21), param="logprobs"),
    Case("gen-repetition-penalty-0", "/generate", gen(repetition_penalty=0), param="repetition_penalty"),
    Case("gen-presence-penalty-3", "/generate", gen(presence_penalty=3), param="presence_penalty"),
    Case("gen-min-tokens-over-max", "/generate", gen(max_tokens=4, min_tokens=5), param="min_tokens"),
    Case("gen-seed-negative", "/generate", gen(seed=-1), param="seed"),
    Case("gen-stop-token-negative", "/generate", gen(stop_token_ids=[-1]), param="stop_token_ids.0"),
    Case("cmpl-logit-bias-key", "/v1/completions", cmpl(logit_bias={"abc": 1}), param="logit_bias.abc"),
    Case("cmpl-logit-bias-101", "/v1/completions", cmpl(logit_bias={"5": 101}), param="logit_bias.5"),
    Case("chat-logit-bias-list", "/v1/chat/completions", chat(logit_bias=[1, 2]), param="logit_bias"),
    Case("chat-logit-bias-vocab", "/v1/chat/completions", chat(logit_bias={"99999999": 1}), param="logit_bias"),
    Case("cmpl-service-tier", "/v1/completions", cmpl(service_tier="flex"), param="service_tier"),
    Case("cmpl-n-0", "/v1/completions", cmpl(n=0), param="n"),
    Case("cmpl-logprobs-21", "/v1/completions", cmpl(logprobs=21), param="logprobs"),
    Case("cmpl-top-p-1.5", "/v1/completions", cmpl(top_p=1.5), param="top_p"),
    Case("cmpl-frequency-penalty-5", "/v1/completions", cmpl(frequency_penalty=5), param="frequency_penalty"),
    Case("chat-max-tokens-0", "/v1/chat/completions", chat(max_tokens=0), param="max_tokens"),
    Case("chat-top-logprobs-21", "/v1/chat/completions", chat(logprobs=True, top_logprobs=21), param="top_logprobs"),
    # --- NaN / Infinity as raw JSON literals -----------------------------------------------------
    Case("gen-temperature-nan", "/generate", raw=b'{"prompt": "Hi", "temperature": NaN}', param="temperature"),
    Case("gen-top-p-infinity", "/generate", raw=b'{"prompt": "Hi", "top_p": Infinity}', param="top_p"),
    Case("gen-max-tokens-infinity", "/generate", raw=b'{"prompt": "Hi", "max_tokens": Infinity}', param="max_tokens"),
    Case("cmpl-temperature-neg-infinity", "/v1/completions",
         raw=b'{"prompt": "Hi", "temperature": -Infinity}', param="temperature"),
    Case("chat-top-p-nan", "/v1/chat/completions",
         raw=b'{"messages": [{"role": "user", "content": "Hi"}], "top_p": NaN}', param="top_p"),
    # --- huge values -----------------------------------------------------------------------------
    Case("gen-max-tokens-1e12", "/generate", gen(max_tokens=10**12), code="context_length_exceeded"),
    Case("gen-seed-2-70", "/generate", gen(seed=2**70), param="seed"),
    Case("cmpl-n-1000", "/v1/completions", cmpl(n=1000), param="n"),
    Case("cmpl-max-tokens-1e12", "/v1/completions", cmpl(max_tokens=10**12), code="context_length_exceeded"),
    Case("chat-seed-2-70", "/v1/chat/completions", chat(seed=2**70), param="seed"),
    Case("gen-temperature-1e300", "/generate", gen(temperature=1e300), param="temperature"),
    # --- unknown fields --------------------------------------------------------------------------
    Case("gen-unknown-field", "/generate", gen(temprature=0.5), param="temprature"),
    Case("cmpl-unknown-field", "/v1/completions", cmpl(best_of_all=2), param="best_of_all"),
    Case("chat-unknown-field", "/v1/chat/completions", chat(tools_x=[]), param="tools_x"),
    Case("chat-message-unknown-field", "/v1/chat/completions",
         chat(messages=[{"role": "user", "content": "Hi", "mood": "happy"}]), param="messages.0.mood"),
    # --- empty prompts and bad token ids ---------------------------------------------------------
    Case("gen-prompt-empty", "/generate", gen(prompt=""), param="prompt"),
    Case("gen-prompt-empty-ids", "/generate", gen(prompt=[]), param="prompt"),
    Case("gen-prompt-id-out-of-vocab", "/generate", gen(prompt=[TINY_SPEC.vocab_size]), param="prompt"),
    Case("gen-prompt-id-negative", "/generate", gen(prompt=[1, -3]), param="prompt.1"),
    Case("cmpl-prompt-empty", "/v1/completions", cmpl(prompt=""), param="prompt"),
    Case("cmpl-prompt-empty-list", "/v1/completions", cmpl(prompt=[]), param="prompt"),
    Case("cmpl-prompt-one-empty", "/v1/completions", cmpl(prompt=["Hi", ""]), param="prompt"),
    Case("cmpl-prompt-id-out-of-vocab", "/v1/completions", cmpl(prompt=[1, 10**6]), param="prompt"),
    Case("detokenize-id-out-of-vocab", "/detokenize", {"tokens": [TINY_SPEC.vocab_size]}, param="tokens"),
    Case("detokenize-id-negative", "/detokenize", {"tokens": [-1]}, param="tokens.0"),
    # --- bodies that are not JSON objects --------------------------------------------------------
    Case("gen-bad-json", "/generate", raw=b'{"prompt": "Hi"', code="invalid_json"),
    Case("cmpl-bad-json", "/v1/completions", raw=b"{prompt: Hi}", code="invalid_json"),
    Case("chat-bad-json", "/v1/chat/completions", raw=b'{"messages": [}', code="invalid_json"),
    Case("gen-json-array", "/generate", raw=b'[{"prompt": "Hi"}]'),
    Case("gen-json-string", "/generate", raw=b'"Hello"'),
    Case("cmpl-json-number", "/v1/completions", raw=b"42"),
    Case("gen-empty-body", "/generate", raw=b""),
    Case("gen-text-plain", "/generate", raw=b'{"prompt": "Hi"}', content_type="text/plain"),
    Case("chat-form-encoded", "/v1/chat/completions", raw=b"messages=Hi",
         content_type="application/x-www-form-urlencoded"),
    Case("gen-oversized-body", "/generate", body={"prompt": "x" * (1 << 20)}, status=413, code="payload_too_large"),
    Case("cmpl-oversized-body", "/v1/completions", body={"prompt": "x" * (2 << 20)}, status=413,
         code="payload_too_large"),
    # --- over the context window -----------------------------------------------------------------
    Case("gen-prompt-plus-max-tokens-over-context", "/generate", gen(prompt=[5] * (CONTEXT - 10), max_tokens=20),
         code="context_length_exceeded"),
    Case("gen-prompt-over-context", "/generate", gen(prompt=[5] * (CONTEXT + 1), max_tokens=1),
         code="context_length_exceeded"),
    Case("cmpl-prompt-over-context", "/v1/completions", cmpl(prompt=[5] * (CONTEXT + 1), max_tokens=None),
         code="context_length_exceeded"),
    Case("chat-over-context", "/v1/chat/completions", chat(max_tokens=CONTEXT), code="context_length_exceeded"),
    # --- stop lists ------------------------------------------------------------------------------
    Case("gen-stop-list-too-long", "/generate", gen(stop=[f"s{i}" for i in range(17)]), param="stop"),
    Case("cmpl-stop-list-too-long", "/v1/completions", cmpl(stop=[f"s{i}" for i in range(100)]), param="stop"),
    Case("cmpl-stop-empty-string", "/v1/completions", cmpl(stop=[""]), param="stop"),
    # --- chat messages ---------------------------------------------------------------------------
    Case("chat-messages-empty", "/v1/chat/completions", chat(messages=[]), param="messages"),
    Case("chat-messages-missing", "/v1/chat/completions", {"model": "tiny-server"}, param="messages"),
    Case("chat-bad-role", "/v1/chat/completions", chat(messages=[{"role": "robot", "content": "Hi"}]),
         param="messages.0.role"),
    Case("chat-missing-content", "/v1/chat/completions", chat(messages=[{"role": "user"}]),
         param="messages.0.content"),
    Case("chat-content-number", "/v1/chat/completions", chat(messages=[{"role": "user", "content": 5}]),
         param="messages.0.content"),
    Case("chat-bad-content-part", "/v1/chat/completions",
         chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]),
         param="messages.0.content.0.type"),
    Case("chat-response-format-unknown", "/v1/chat/completions", chat(response_format={"type": "yaml"}),
         param="response_format.type"),
    Case("tokenize-both-prompt-and-messages", "/tokenize", {"prompt": "Hi", "messages": CHAT}, param="prompt"),
    Case("tokenize-neither", "/tokenize", {}, param="prompt"),
    # --- OpenAI extras ---------------------------------------------------------------------------
    Case("cmpl-unknown-model", "/v1/completions", cmpl(model="gpt-4"), status=404, code="model_not_found"),
    Case("chat-unknown-model", "/v1/chat/completions", chat(model="llama-70b"), status=404, code="model_not_found"),
    Case("cmpl-echo-with-logprobs", "/v1/completions", cmpl(echo=True, logprobs=1), param="echo"),
    Case("cmpl-stream-options-unknown", "/v1/completions", cmpl(stream=True, stream_options={"x": 1}),
         param="stream_options.x"),
    # --- routing ---------------------------------------------------------------------------------
    Case("get-generate", "/generate", method="GET", status=405, code="method_not_allowed"),
    Case("get-generate-stream", "/generate/stream", method="GET", status=405, code="method_not_allowed"),
    Case("get-completions", "/v1/completions", method="GET", status=405, code="method_not_allowed"),
    Case("get-chat", "/v1/chat/completions", method="GET", status=405, code="method_not_allowed"),
    Case("get-cancel", "/cancel/abc", method="GET", status=405, code="method_not_allowed"),
    Case("post-status", "/status/abc", method="POST", status=405, code="method_not_allowed"),
    Case("post-models", "/v1/models", method="POST", status=405, code="method_not_allowed"),
    Case("unknown-route", "/v2/completions", method="POST", status=404, code="not_found"),
    Case("unknown-route-get", "/nothing/here", method="GET", status=404, code="not_found"),
    Case("status-unknown-id", "/status/never-seen", method="GET", status=404, code="request_not_found"),
    Case("cancel-unknown-id", "/cancel/never-seen", method="POST", status=404, code="request_not_found"),
]


@pytest.fixture(scope="module")
def log_offset(server: Server) -> int:
    """Where the server log stood before the table ran."""
    return len(server.log())


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_invalid_request_is_a_4xx_with_the_error_shape(client: httpx.Client, log_offset: int, case: Case) -> None:
    kwargs: dict[str, Any] = {"headers": dict(case.headers)}
    if case.raw is not None:
        kwargs["content"] = case.raw
        kwargs["headers"]["content-type"] = case.content_type
    elif case.body is not None:
        kwargs["json"] = case.body
    response = client.request(case.method, case.path, **kwargs)
    assert 400 <= response.status_code < 500, response.text
    error = assert_error_shape(response, case.status, case.code)
    if case.param is not None:
        assert error["param"] == case.param, error


def test_chosen_request_id_is_echoed_in_the_error(client: httpx.Client) -> None:
    response = client.post("/generate", json=gen(max_tokens=0), headers={"X-Request-Id": "my-bad-request"})
    assert assert_error_shape(response, 400)["request_id"] == "my-bad-request"
    # An unusable id (too long) is replaced by a server-made one.
    response = client.post("/generate", json=gen(max_tokens=0), headers={"X-Request-Id": "x" * 500})
    assert assert_error_shape(response, 400)["request_id"] != "x" * 500


def test_the_table_is_large_and_spread_over_routes() -> None:
    assert len(CASES) >= 50
    assert len({c.id for c in CASES}) == len(CASES)
    for prefix in ("/generate", "/v1/completions", "/v1/chat/completions"):
        assert sum(c.path == prefix for c in CASES) >= 10, prefix


def test_server_still_serves_after_the_table(client: httpx.Client, server: Server, log_offset: int) -> None:
    response = client.post("/generate", json=gen(max_tokens=3, ignore_eos=True))
    assert response.status_code == 200, response.text
    assert response.json()["num_generated_tokens"] == 3
    values = metric_values(client)
    assert values["rocmforge_engine_alive"] == 1.0
    assert client.get("/health").json()["status"] == "ok"
    new_log = server.log()[log_offset:]
    assert "Traceback" not in new_log and "unhandled error" not in new_log, new_log
