"""The native API of a real server: every endpoint, checked against the in-process ``LLM``."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from httpx_sse import connect_sse
from live_server import MODEL_NAME, TINY_SPEC, assert_error_shape, metric_values

from rocmforge import LLM, SamplingParams

PROMPT = "The quick brown fox"
TIMING_KEYS = {"queue_ms", "prefill_ms", "decode_ms", "time_to_first_token_ms", "total_ms"}


@pytest.fixture(scope="module")
def reference_llm(tiny_gguf: Path) -> LLM:
    return LLM(tiny_gguf, device="cpu", dtype="float32")


def _generate(client: httpx.Client, body: dict, request_id: str | None = None) -> httpx.Response:
    headers = {"X-Request-Id": request_id} if request_id else {}
    return client.post("/generate", json=body, headers=headers)


def _stream_events(client: httpx.Client, body: dict) -> tuple[str, list]:
    with connect_sse(client, "POST", "/generate/stream", json=body) as source:
        assert source.response.status_code == 200
        assert source.response.headers["content-type"].startswith("text/event-stream")
        return source.response.headers["x-request-id"], list(source.iter_sse())


def test_generate_greedy_matches_in_process_llm(client: httpx.Client, reference_llm: LLM) -> None:
    response = _generate(client, {"prompt": PROMPT, "max_tokens": 12, "temperature": 0})
    assert response.status_code == 200, response.text
    body = response.json()
    [expected] = reference_llm.generate(PROMPT, SamplingParams(max_tokens=12, temperature=0.0))
    assert body["token_ids"] == expected.token_ids
    assert body["text"] == expected.text
    assert body["finish_reason"] == expected.finish_reason
    assert body["num_prompt_tokens"] == len(reference_llm.tokenize(PROMPT, add_special=True))
    assert body["num_generated_tokens"] == len(expected.token_ids)
    assert body["request_id"] == response.headers["x-request-id"]
    timings = body["timings"]
    assert set(timings) == TIMING_KEYS
    assert all(isinstance(v, (int, float)) and v >= 0 for v in timings.values()), timings
    assert timings["total_ms"] >= timings["time_to_first_token_ms"]


def test_generate_token_id_prompt_and_logprobs(client: httpx.Client, reference_llm: LLM) -> None:
    ids = reference_llm.tokenize(PROMPT, add_special=True)
    by_text = _generate(client, {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "ignore_eos": True}).json()
    response = _generate(client, {"prompt": ids, "max_tokens": 6, "temperature": 0, "ignore_eos": True,
                                  "logprobs": 2})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["token_ids"] == by_text["token_ids"]
    assert body["num_prompt_tokens"] == len(ids)
    assert body["num_generated_tokens"] == 6 and body["finish_reason"] == "length"
    assert len(body["logprobs"]) == 6
    for token_id, entry in zip(body["token_ids"], body["logprobs"]):
        assert entry["token_id"] == token_id
        assert len(entry["top"]) == 2
        assert entry["logprob"] <= 0
        # Greedy: the chosen token is the most likely one.
        assert entry["top"][0]["token_id"] == token_id
        assert entry["top"][0]["logprob"] == pytest.approx(entry["logprob"], abs=1e-5)
        assert entry["top"][0]["logprob"] >= entry["top"][1]["logprob"]


def test_stream_deltas_concatenate_to_the_non_streamed_text(client: httpx.Client) -> None:
    request = {"prompt": PROMPT, "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    plain = _generate(client, request).json()
    request_id, events = _stream_events(client, request)
    deltas = [e for e in events if e.event == "delta"]
    assert deltas, events
    assert [e.event for e in events] == ["delta"] * len(deltas) + ["done"]
    data = [e.json() for e in deltas]
    assert all(d["request_id"] == request_id for d in data)
    assert "".join(d["delta"] for d in data) == plain["text"]
    assert [t for d in data for t in d["token_ids"]] == plain["token_ids"]
    done = events[-1].json()
    assert done["request_id"] == request_id
    assert done["finish_reason"] == "length"
    assert done["usage"] == {"prompt_tokens": plain["num_prompt_tokens"], "completion_tokens": 16,
                             "total_tokens": plain["num_prompt_tokens"] + 16}
    assert set(done["timings"]) == TIMING_KEYS


def test_status_of_a_finished_request(client: httpx.Client) -> None:
    body = _generate(client, {"prompt": PROMPT, "max_tokens": 5, "temperature": 0, "ignore_eos": True},
                     request_id="native-status-1").json()
    assert body["request_id"] == "native-status-1"
    response = client.get("/status/native-status-1")
    assert response.status_code == 200, response.text
    status = response.json()
    assert status["request_id"] == "native-status-1"
    assert status["state"] == "finished"
    assert status["finish_reason"] == "length"
    assert status["error"] is None
    assert status["queue_position"] is None
    assert status["num_prompt_tokens"] == body["num_prompt_tokens"]
    assert status["num_generated_tokens"] == 5
    assert status["timings"]["total_ms"] is not None


def test_cancel_is_idempotent_and_unknown_ids_are_404(client: httpx.Client) -> None:
    _generate(client, {"prompt": PROMPT, "max_tokens": 3, "temperature": 0}, request_id="native-cancel-1")
    for _ in range(2):
        response = client.post("/cancel/native-cancel-1")
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["request_id"] == "native-cancel-1"
        assert body["cancelled"] is False  # it had already finished
        assert body["state"] == "finished"
    error = assert_error_shape(client.post("/cancel/no-such-request"), 404, "request_not_found")
    assert "no-such-request" in error["message"]
    assert_error_shape(client.get("/status/no-such-request"), 404, "request_not_found")


@pytest.mark.parametrize("request_id", ["with/slash", "q?x=1#frag", "100%done", "[/bold]"],
                         ids=["slash", "query-fragment", "percent", "brackets"])
def test_client_request_ids_with_url_characters_are_reachable(client: httpx.Client, request_id: str) -> None:
    body = _generate(client, {"prompt": PROMPT, "max_tokens": 2}, request_id=request_id).json()
    assert body["request_id"] == request_id
    quoted = quote(request_id, safe="")
    status = client.get(f"/status/{quoted}")
    assert status.status_code == 200, status.text
    assert status.json()["request_id"] == request_id and status.json()["state"] == "finished"
    cancel = client.post(f"/cancel/{quoted}")
    assert cancel.status_code == 200 and cancel.json()["request_id"] == request_id, cancel.text


def test_models(client: httpx.Client, tiny_gguf: Path) -> None:
    response = client.get("/models")
    assert response.status_code == 200
    [model] = response.json()["models"]
    assert model["id"] == MODEL_NAME
    assert Path(model["path"]) == tiny_gguf
    assert model["max_model_len"] == TINY_SPEC.max_context
    assert model["vocab_size"] == TINY_SPEC.vocab_size
    assert model["has_chat_template"] is True


@pytest.mark.parametrize("text", ["Hello, world! The capital of France is Paris.", "Caf\u00e9 \u6771\u4eac \U0001f600"])
def test_tokenize_detokenize_round_trip(client: httpx.Client, reference_llm: LLM, text: str) -> None:
    response = client.post("/tokenize", json={"prompt": text})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["tokens"] == reference_llm.tokenize(text, add_special=True)
    assert body["count"] == len(body["tokens"]) > 0
    assert body["max_model_len"] == TINY_SPEC.max_context
    back = client.post("/detokenize", json={"tokens": body["tokens"]})
    assert back.status_code == 200, back.text
    assert back.json() == {"prompt": text}


def test_tokenize_messages_uses_the_chat_template(client: httpx.Client, reference_llm: LLM) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    body = client.post("/tokenize", json={"messages": messages}).json()
    rendered = reference_llm.apply_chat_template(messages)
    assert rendered.endswith("<|im_start|>assistant\n")
    assert body["tokens"] == reference_llm.tokenize(rendered, add_special=False)


def test_health_and_ready(client: httpx.Client) -> None:
    health = client.get("/health")
    assert health.status_code == 200
    body = health.json()
    assert body["status"] == "ok" and body["model"] == MODEL_NAME
    assert body["checks"]["engine_loop"] == "alive"
    ready = client.get("/ready")
    assert ready.status_code == 200
    assert ready.json() == {"ready": True, "reason": None}


def test_metrics_parse_as_prometheus_text(client: httpx.Client) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    _generate(client, {"prompt": PROMPT, "max_tokens": 2})
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    for name in ("rocmforge_requests_running", "rocmforge_requests_waiting", "rocmforge_kv_cache_usage_ratio",
                 "rocmforge_engine_alive", "rocmforge_prefix_cache_queries", "rocmforge_build_info"):
        assert name in families, sorted(families)
    assert families["rocmforge_requests_running"].type == "gauge"
    assert families["rocmforge_prefix_cache_queries"].type == "counter"
    [build] = families["rocmforge_build_info"].samples
    assert build.labels["model"] == MODEL_NAME
    values = metric_values(client)
    assert values["rocmforge_engine_alive"] == 1.0
    assert values["rocmforge_prefix_cache_queries_total"] > 0  # the requests above were looked up
    assert 0.0 <= values["rocmforge_kv_cache_usage_ratio"] <= 1.0
