"""``POST /v1/embeddings`` on real servers, through the official ``openai`` client.

The embedding server runs the tiny random-weight model with ``--pooling mean`` and a 16-token
step budget, so most inputs are prefilled in several chunks, and a batch of inputs is split
into chunks differently than each input alone. The default server (no ``--pooling``, a
generation model) must refuse embeddings with a message saying how to enable them.
"""

from __future__ import annotations

import base64
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import openai
import pytest
from live_server import (
    HTTP_TIMEOUT,
    MODEL_NAME,
    TINY_SPEC,
    Server,
    assert_error_shape,
    serving,
    wait_for_status,
    wait_until_idle,
)

CHUNK = 16
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "It was the best of times, it was the worst of times.",
    "def add(a, b):\n    return a + b\n",
    "Once upon a time there was a curious cat.",
]


@pytest.fixture(scope="module")
def embed_server(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from serving(tiny_gguf, tmp_path_factory.mktemp("embed-log"), "--model-name", MODEL_NAME,
                       "--pooling", "mean", "--max-num-batched-tokens", str(CHUNK), "--max-num-seqs", "16")


@pytest.fixture
def oai(embed_server: Server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{embed_server.url}/v1", api_key="unused", max_retries=0) as client:
        yield client


@pytest.fixture
def http(embed_server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=embed_server.url, timeout=HTTP_TIMEOUT) as client:
        yield client


def _vectors(response) -> list[np.ndarray]:
    assert [d.index for d in response.data] == list(range(len(response.data)))
    assert all(d.object == "embedding" for d in response.data)
    return [np.asarray(d.embedding, dtype=np.float64) for d in response.data]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _tokens(http: httpx.Client, text: str) -> int:
    response = http.post("/tokenize", json={"prompt": text})
    assert response.status_code == 200, response.text
    return response.json()["count"]


def test_the_same_text_twice_is_the_same_vector_and_different_texts_differ(oai: openai.OpenAI) -> None:
    response = oai.embeddings.create(model=MODEL_NAME, input=[TEXTS[0], TEXTS[0], TEXTS[1]])
    assert response.object == "list" and response.model == MODEL_NAME
    first, again, other = _vectors(response)
    assert first.shape == (TINY_SPEC.hidden_size,)
    assert abs(float(np.linalg.norm(first)) - 1.0) < 1e-5  # L2-normalised
    assert abs(_cosine(first, again) - 1.0) < 1e-5
    assert _cosine(first, other) < 1.0 - 1e-3
    [single] = _vectors(oai.embeddings.create(model=MODEL_NAME, input=TEXTS[0]))
    np.testing.assert_allclose(single, first, atol=1e-5, rtol=0)


def test_a_batch_of_16_equals_16_single_calls(oai: openai.OpenAI) -> None:
    inputs = [f"{TEXTS[i % len(TEXTS)]} Variant {i}: " + "word " * i for i in range(16)]
    batch = _vectors(oai.embeddings.create(model=MODEL_NAME, input=inputs))
    assert len(batch) == 16
    for text, vector in zip(inputs, batch, strict=True):
        [alone] = _vectors(oai.embeddings.create(model=MODEL_NAME, input=text))
        np.testing.assert_allclose(vector, alone, atol=1e-5, rtol=0)


def test_base64_decodes_to_the_float_answer(http: httpx.Client) -> None:
    floats = http.post("/v1/embeddings", json={"input": TEXTS[:2], "encoding_format": "float"})
    encoded = http.post("/v1/embeddings", json={"input": TEXTS[:2], "encoding_format": "base64"})
    assert floats.status_code == encoded.status_code == 200, (floats.text, encoded.text)
    for as_float, as_base64 in zip(floats.json()["data"], encoded.json()["data"], strict=True):
        assert isinstance(as_base64["embedding"], str)
        decoded = np.frombuffer(base64.b64decode(as_base64["embedding"]), dtype="<f4")
        assert decoded.shape == (TINY_SPEC.hidden_size,)
        np.testing.assert_array_equal(decoded, np.asarray(as_float["embedding"], dtype=np.float32))


def test_the_clients_default_encoding_is_the_float_answer(oai: openai.OpenAI, http: httpx.Client) -> None:
    """The ``openai`` client asks for base64 unless told otherwise and decodes it itself."""
    [decoded] = _vectors(oai.embeddings.create(model=MODEL_NAME, input=TEXTS[2]))
    [as_float] = http.post("/v1/embeddings", json={"input": TEXTS[2]}).json()["data"]
    np.testing.assert_allclose(decoded, as_float["embedding"], atol=0, rtol=0)


@pytest.mark.parametrize("dimensions", [1, 8, TINY_SPEC.hidden_size])
def test_dimensions_keep_the_first_n_normalised(oai: openai.OpenAI, dimensions: int) -> None:
    [full] = _vectors(oai.embeddings.create(model=MODEL_NAME, input=TEXTS[3]))
    [short] = _vectors(oai.embeddings.create(model=MODEL_NAME, input=TEXTS[3], dimensions=dimensions))
    assert short.shape == (dimensions,)
    head = full[:dimensions]
    np.testing.assert_allclose(short, head / np.linalg.norm(head), atol=1e-5, rtol=0)


def test_usage_counts_the_input_tokens(oai: openai.OpenAI, http: httpx.Client) -> None:
    ids = [[5, 6, 7], [10, 11, 12, 13, 14, 15, 16]]
    response = oai.embeddings.create(model=MODEL_NAME, input=ids)
    assert len(response.data) == 2
    assert response.usage.prompt_tokens == response.usage.total_tokens == 10
    one = oai.embeddings.create(model=MODEL_NAME, input=[1, 2, 3, 4])  # one list of ids is one input
    assert len(one.data) == 1 and one.usage.prompt_tokens == 4
    texts = oai.embeddings.create(model=MODEL_NAME, input=TEXTS[:2], user="someone")
    expected = sum(_tokens(http, text) for text in TEXTS[:2])
    assert texts.usage.prompt_tokens == texts.usage.total_tokens == expected


def test_token_ids_and_their_text_embed_alike(oai: openai.OpenAI, http: httpx.Client) -> None:
    ids = http.post("/tokenize", json={"prompt": TEXTS[1]}).json()["tokens"]
    [from_ids] = _vectors(oai.embeddings.create(model=MODEL_NAME, input=ids))
    [from_text] = _vectors(oai.embeddings.create(model=MODEL_NAME, input=TEXTS[1]))
    np.testing.assert_allclose(from_ids, from_text, atol=1e-5, rtol=0)


BAD_INPUTS = {
    "empty-list": ({"input": []}, "input", "invalid_request"),
    "empty-string": ({"input": ""}, "input", "invalid_request"),
    "an-empty-string-of-many": ({"input": ["fine", ""]}, "input", "invalid_request"),
    "empty-id-list": ({"input": [[1, 2], []]}, "input.1", "invalid_request"),  # the element, as elsewhere
    "id-out-of-vocabulary": ({"input": [1, TINY_SPEC.vocab_size]}, "input", "invalid_request"),
    "negative-id": ({"input": [1, -1]}, "input.1", "invalid_request"),
    "too-long-ids": ({"input": [1] * (TINY_SPEC.max_context + 1)}, "input", "context_length_exceeded"),
    "too-long-text": ({"input": "word " * (4 * TINY_SPEC.max_context)}, "input", "context_length_exceeded"),
    "too-many-inputs": ({"input": ["x"] * 65}, "input", "invalid_request"),
    "mixed-list": ({"input": ["x", 1]}, "input", "invalid_request"),
    "dimensions-zero": ({"input": "x", "dimensions": 0}, "dimensions", "invalid_request"),
    "dimensions-too-many": ({"input": "x", "dimensions": TINY_SPEC.hidden_size + 1}, "dimensions",
                            "invalid_request"),
    "encoding-format": ({"input": "x", "encoding_format": "int8"}, "encoding_format", "invalid_request"),
    "unknown-field": ({"input": "x", "temperature": 0.5}, "temperature", "invalid_request"),
    "no-input": ({"model": MODEL_NAME}, "input", "invalid_request"),
}


@pytest.mark.parametrize("body,param,code", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_is_a_400_naming_the_field(http: httpx.Client, body: dict, param: str, code: str) -> None:
    error = assert_error_shape(http.post("/v1/embeddings", json=body), 400, code)
    assert error["param"] == param, error
    assert error["type"] == "user"
    response = http.post("/v1/embeddings", json={"input": "still serving"})
    assert response.status_code == 200, response.text
    assert wait_until_idle(http)["rocmforge_kv_cache_usage_ratio"] == 0


def test_the_openai_client_sees_the_400(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        oai.embeddings.create(model=MODEL_NAME, input=[0, TINY_SPEC.vocab_size + 5])
    assert err.value.body["param"] == "input" and "vocabulary" in err.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        oai.embeddings.create(model="another-model", input="x")


def test_metrics_count_embedding_requests_and_pooled_tokens(http: httpx.Client) -> None:
    before = wait_until_idle(http)
    response = http.post("/v1/embeddings", json={"input": [[1, 2, 3], [4, 5, 6, 7, 8]]})
    assert response.status_code == 200, response.text
    after = wait_until_idle(http)
    assert after["rocmforge_embedding_requests_total"] - before["rocmforge_embedding_requests_total"] == 2
    assert after["rocmforge_pooled_tokens_total"] - before["rocmforge_pooled_tokens_total"] == 8
    assert after["rocmforge_prompt_tokens_total"] - before["rocmforge_prompt_tokens_total"] == 8
    assert after["rocmforge_generation_tokens_total"] == before["rocmforge_generation_tokens_total"]


def test_a_client_that_goes_away_cancels_its_embedding_requests(embed_server: Server, http: httpx.Client) -> None:
    """16 inputs of 4000 tokens at 16 tokens a step take thousands of steps (first come, first
    served: one at a time): the client closes its connection while the first runs; those not
    done by then end cancelled, and every block is freed."""
    request_id = "embed-disconnect"
    body = json.dumps({"input": [[(i + j) % 300 for j in range(4000)] for i in range(16)]}).encode()
    url = urlsplit(embed_server.url)
    head = (f"POST /v1/embeddings HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nX-Request-Id: {request_id}\r\n\r\n").encode()
    with socket.create_connection((url.hostname, url.port), timeout=5.0) as sock:
        sock.sendall(head + body)
        running = wait_for_status(http, f"{request_id}-0", lambda s: s.get("state") == "prefill", timeout=10.0)
        assert running.get("state") == "prefill", running
    reasons = []
    for i in range(16):
        status = wait_for_status(http, f"{request_id}-{i}", lambda s: s.get("state") == "finished", timeout=5.0)
        assert status.get("state") == "finished", status
        reasons.append(status["finish_reason"])
    assert set(reasons) <= {"stop", "cancelled"}, reasons
    assert reasons == sorted(reasons, key=lambda r: r == "cancelled"), reasons  # done ones first, in order
    assert reasons.count("cancelled") >= 8, reasons  # far from all 64000 tokens were pooled
    values = wait_until_idle(http)
    assert values["rocmforge_requests_running"] == values["rocmforge_requests_waiting"] == 0, values
    assert values["rocmforge_kv_cache_usage_ratio"] == 0, values


def test_a_server_without_pooling_says_how_to_enable_it(base_url: str) -> None:
    with httpx.Client(base_url=base_url, timeout=HTTP_TIMEOUT) as http:
        error = assert_error_shape(http.post("/v1/embeddings", json={"input": "hello"}), 400, "embeddings_unsupported")
        assert "--pooling mean|cls|last" in error["message"], error
        assert "no pooling_type" in error["message"], error
        assert http.post("/v1/completions", json={"prompt": "hello", "max_tokens": 2}).status_code == 200
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0) as oai:
        with pytest.raises(openai.BadRequestError, match="--pooling"):
            oai.embeddings.create(model=MODEL_NAME, input="hello")


# --- Ollama's embedding routes, on the same engine path ---------------------------------------


def test_ollama_embed_equals_the_openai_route(embed_server: Server, oai: openai.OpenAI) -> None:
    import ollama

    texts = ["The quick brown fox", "Hello, world!", "1, 2, 3"]
    reference = _vectors(oai.embeddings.create(model=MODEL_NAME, input=texts, encoding_format="float"))
    client = ollama.Client(host=embed_server.url)
    answer = client.embed(model=f"{MODEL_NAME}:latest", input=texts)
    assert answer.model == f"{MODEL_NAME}:latest" and answer.prompt_eval_count > 0
    got = [np.asarray(v, dtype=np.float64) for v in answer.embeddings]
    assert all(np.allclose(a, b, atol=1e-6) for a, b in zip(got, reference))
    assert all(abs(np.linalg.norm(v) - 1.0) < 1e-5 for v in got)
    [short] = client.embed(model=MODEL_NAME, input=texts[0], dimensions=8).embeddings
    assert len(short) == 8 and abs(np.linalg.norm(short) - 1.0) < 1e-5
    legacy = client.embeddings(model=MODEL_NAME, prompt=texts[0]).embedding
    raw = _vectors(oai.embeddings.create(model=MODEL_NAME, input=texts[0], extra_body={"normalize": False}))[0]
    assert np.allclose(legacy, raw, atol=1e-6) and abs(np.linalg.norm(legacy) - 1.0) > 1e-3


def test_ollama_embed_truncates_long_inputs_unless_told_not_to(http: httpx.Client) -> None:
    long = "The quick brown fox jumps over the lazy dog. " * 400  # far past the 4096-token context
    cut = http.post("/api/embed", json={"model": MODEL_NAME, "input": long})
    assert cut.status_code == 200, cut.text
    assert cut.json()["prompt_eval_count"] == 4096
    refused = http.post("/api/embed", json={"model": MODEL_NAME, "input": long, "truncate": False})
    assert refused.status_code == 400 and "context" in refused.json()["error"], refused.text


@pytest.mark.parametrize("body, status, words", [
    ({"model": MODEL_NAME, "input": []}, 400, "input"),
    ({"model": MODEL_NAME, "input": ""}, 400, "input"),
    ({"model": MODEL_NAME, "input": [1, 2]}, 400, "input"),
    ({"model": MODEL_NAME, "input": "x", "dimensions": 0}, 400, "dimensions"),
    ({"model": "other", "input": "x"}, 404, "not found"),
    ({"input": "x"}, 400, "model"),
])
def test_bad_ollama_embed_bodies(http: httpx.Client, body: dict, status: int, words: str) -> None:
    response = http.post("/api/embed", json=body)
    assert response.status_code == status, response.text
    assert set(response.json()) == {"error"} and words in response.json()["error"], response.text
    assert http.post("/api/embed", json={"model": MODEL_NAME, "input": "still serving"}).status_code == 200


def test_ollama_embed_without_pooling_is_a_400(base_url: str) -> None:
    response = httpx.post(f"{base_url}/api/embed", json={"model": MODEL_NAME, "input": "x"}, timeout=HTTP_TIMEOUT)
    assert response.status_code == 400 and "--pooling" in response.json()["error"]


def test_ollama_show_lists_embedding_as_a_capability(embed_server: Server) -> None:
    import ollama

    shown = ollama.Client(host=embed_server.url).show(MODEL_NAME)
    assert "embedding" in shown.capabilities and "completion" in shown.capabilities
