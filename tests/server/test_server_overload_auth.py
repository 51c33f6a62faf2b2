"""Admission control (429 with ``Retry-After`` when the queue is full) and the API key (401 on
every route but ``/health``), each on its own real server."""

from __future__ import annotations

from collections.abc import Iterator

import anthropic
import httpx
import openai
import pytest
from httpx_sse import connect_sse
from live_server import (
    API_KEY,
    HTTP_TIMEOUT,
    LONG_MAX_TOKENS,
    MODEL_NAME,
    Server,
    assert_anthropic_error,
    assert_error_shape,
    wait_for_status,
    wait_until_idle,
)

LONG = {"prompt": "Once upon a time", "max_tokens": LONG_MAX_TOKENS, "temperature": 0, "ignore_eos": True}

# --- 429: one running slot, one waiting slot -----------------------------------------------------


@pytest.fixture
def small_client(small_server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=small_server.url, timeout=HTTP_TIMEOUT) as c:
        yield c


def test_full_queue_answers_429_with_retry_after(small_client: httpx.Client, small_server: Server) -> None:
    client = small_client
    with (
        httpx.Client(base_url=small_server.url, timeout=HTTP_TIMEOUT) as holder,
        connect_sse(holder, "POST", "/generate/stream", json=LONG,
                    headers={"X-Request-Id": "hold-running"}) as running,
    ):
        # One iterator for the whole stream: dropping a half-read one closes the connection.
        running_events = running.iter_sse()
        assert next(running_events).event == "delta"  # a token came back: it runs
        with (
            httpx.Client(base_url=small_server.url, timeout=HTTP_TIMEOUT) as waiter,
            connect_sse(waiter, "POST", "/generate/stream", json=LONG,
                        headers={"X-Request-Id": "hold-waiting"}) as waiting,
        ):
            assert waiting.response.status_code == 200
            status = wait_for_status(client, "hold-waiting", lambda b: b.get("state") == "queued")
            assert status["state"] == "queued" and status["queue_position"] == 0, status
            assert client.get("/status/hold-running").json()["state"] == "decode"

            refused = [
                client.post("/generate", json={"prompt": "Hi", "max_tokens": 2}),
                client.post("/generate/stream", json={"prompt": "Hi", "max_tokens": 2}),
                client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}),
                client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                          "max_tokens": 2}),
            ]
            for response in refused:
                error = assert_error_shape(response, 429, "overloaded")
                assert error["type"] == "recoverable"
                assert int(response.headers["retry-after"]) >= 1
            anthropic_refused = client.post("/v1/messages", json=VALID_BODIES["/v1/messages"])
            assert_anthropic_error(anthropic_refused, 429, "rate_limit_error")
            assert int(anthropic_refused.headers["retry-after"]) >= 1
            # A chosen request id is echoed in the refusal.
            mine = client.post("/generate", json={"prompt": "Hi", "max_tokens": 2},
                               headers={"X-Request-Id": "refused-1"})
            assert assert_error_shape(mine, 429)["request_id"] == "refused-1"
            # The readiness probe tells load balancers to look elsewhere meanwhile.
            ready = client.get("/ready")
            assert ready.status_code == 503 and ready.json()["reason"] == "queue is full"

            for request_id in ("hold-waiting", "hold-running"):
                cancel = client.post(f"/cancel/{request_id}")
                assert cancel.status_code == 200 and cancel.json()["cancelled"] is True, cancel.text
            waiting_rest = list(waiting.iter_sse())
        running_rest = list(running_events)
    assert [e.event for e in waiting_rest] == ["done"], waiting_rest  # it never ran
    assert waiting_rest[-1].json()["finish_reason"] == "cancelled"
    assert waiting_rest[-1].json()["usage"]["completion_tokens"] == 0
    assert running_rest[-1].event == "done" and running_rest[-1].json()["finish_reason"] == "cancelled"
    values = wait_until_idle(client)
    assert values["rocmforge_requests_running"] == 0 and values["rocmforge_kv_cache_usage_ratio"] == 0, values
    assert client.get("/ready").status_code == 200
    after = client.post("/generate", json={"prompt": "Hi", "max_tokens": 2, "ignore_eos": True})
    assert after.status_code == 200 and after.json()["num_generated_tokens"] == 2


# --- 401: the API key ---------------------------------------------------------------------------

AUTH = {"Authorization": f"Bearer {API_KEY}"}
DOC_ROUTES = [("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/redoc")]
"""Served by FastAPI itself, not listed in the schema, protected all the same."""
VALID_BODIES = {
    "/generate": {"prompt": "Hi", "max_tokens": 2},
    "/generate/stream": {"prompt": "Hi", "max_tokens": 2},
    "/tokenize": {"prompt": "Hi"},
    "/detokenize": {"tokens": [1, 2]},
    "/v1/completions": {"prompt": "Hi", "max_tokens": 2},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
    "/v1/messages": {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
    "/v1/messages/count_tokens": {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}]},
    "/api/generate": {"model": MODEL_NAME, "prompt": "Hi", "stream": False, "options": {"num_predict": 2}},
    "/api/chat": {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "stream": False,
                  "options": {"num_predict": 2}},
    "/api/show": {"model": MODEL_NAME},
    "/api/pull": {"model": MODEL_NAME, "stream": False},
}
ANTHROPIC_PREFIX = "/v1/messages"
"""Routes under it answer errors in Anthropic's shape (its 401 is ``authentication_error``)."""
REFUSING_ROUTES = {"/api/push", "/api/create", "/api/copy", "/api/delete"}
"""Ollama's model management: with the key, a 403 (one model, fixed at start-up)."""
KNOWN_ROUTES = {"/generate", "/generate/stream", "/status/{request_id}", "/cancel/{request_id}", "/models",
                "/tokenize", "/detokenize", "/v1/models", "/v1/completions", "/v1/chat/completions", "/health",
                "/ready", "/metrics", "/v1/messages", "/v1/messages/count_tokens", "/", "/api/generate",
                "/api/chat", "/api/tags", "/api/show", "/api/ps", "/api/version", *REFUSING_ROUTES}


@pytest.fixture(scope="module")
def protected_routes(auth_server: Server) -> list[tuple[str, str]]:
    """(method, path template) of every route but /health, from the live OpenAPI schema."""
    response = httpx.get(f"{auth_server.url}/openapi.json", headers=AUTH, timeout=HTTP_TIMEOUT)
    assert response.status_code == 200, response.text
    paths = response.json()["paths"]
    assert KNOWN_ROUTES <= set(paths), sorted(paths)
    routes = [(method.upper(), path) for path, item in paths.items() for method in item if path != "/health"]
    return routes + DOC_ROUTES


def _concrete(path: str, request_id: str) -> str:
    return path.replace("{request_id}", request_id)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-key"}, {"Authorization": f"Basic {API_KEY}"},
                                     {"Authorization": API_KEY}, {"Authorization": f"Bearer {API_KEY}x"},
                                     {"x-api-key": "wrong-key"}, {"x-api-key": "", "Authorization": "Bearer x"}],
                         ids=["missing", "wrong", "basic-scheme", "no-scheme", "longer", "wrong-x-api-key",
                              "both-wrong"])
def test_every_protected_route_needs_the_key(auth_server: Server, protected_routes: list[tuple[str, str]],
                                             headers: dict[str, str]) -> None:
    with httpx.Client(base_url=auth_server.url, timeout=HTTP_TIMEOUT, headers=headers) as client:
        for method, path in protected_routes:
            url = _concrete(path, "some-id")
            response = client.request(method, url, json=VALID_BODIES.get(path) if method == "POST" else None)
            assert response.headers["www-authenticate"] == "Bearer", (method, path)
            assert API_KEY not in response.text
            if path.startswith(ANTHROPIC_PREFIX):
                assert_anthropic_error(response, 401, "authentication_error")
                continue
            if path.startswith("/api/"):  # Ollama's routes answer in Ollama's shape
                assert response.status_code == 401, (method, path, response.text)
                assert response.json() == {"error": "missing or invalid API key"}, (method, path)
                continue
            error = assert_error_shape(response, 401, "invalid_api_key")
            assert error["type"] == "user", (method, path)


def test_health_is_open_and_the_right_key_works_everywhere(auth_server: Server,
                                                           protected_routes: list[tuple[str, str]]) -> None:
    assert httpx.get(f"{auth_server.url}/health", timeout=HTTP_TIMEOUT).status_code == 200
    with httpx.Client(base_url=auth_server.url, timeout=HTTP_TIMEOUT, headers=AUTH) as client:
        finished = client.post("/generate", json={"prompt": "Hi", "max_tokens": 2}, headers={"X-Request-Id": "auth-1"})
        assert finished.status_code == 200, finished.text
        for method, path in protected_routes:
            body = VALID_BODIES.get(path) if method == "POST" else None
            response = client.request(method, _concrete(path, "auth-1"), json=body)
            # Routes added later without an example body still must not answer 401.
            if path in REFUSING_ROUTES:
                assert response.status_code == 403, (method, path, response.text)
            elif method == "POST" and path not in VALID_BODIES and "{" not in path:
                assert response.status_code != 401, (method, path, response.text)
            else:
                assert response.status_code == 200, (method, path, response.text)


def test_the_key_as_x_api_key(auth_server: Server) -> None:
    """Anthropic's clients send the key as ``x-api-key``."""
    response = httpx.get(f"{auth_server.url}/v1/models", headers={"x-api-key": API_KEY}, timeout=HTTP_TIMEOUT)
    assert response.status_code == 200, response.text
    # either header holding the key will do: a stray one beside it does not lock the client out
    for headers in ({"x-api-key": "stray", "Authorization": f"Bearer {API_KEY}"},
                    {"x-api-key": API_KEY, "Authorization": "Bearer stray"}):
        assert httpx.get(f"{auth_server.url}/v1/models", headers=headers, timeout=HTTP_TIMEOUT).status_code == 200


def test_openai_client_with_and_without_the_key(auth_server: Server) -> None:
    with openai.OpenAI(base_url=f"{auth_server.url}/v1", api_key=API_KEY, timeout=30.0, max_retries=0) as good:
        assert [m.id for m in good.models.list().data] == [MODEL_NAME]
        completion = good.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=3,
                                             extra_body={"ignore_eos": True})
        assert completion.usage.completion_tokens == 3
    with openai.OpenAI(base_url=f"{auth_server.url}/v1", api_key="wrong", timeout=30.0, max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as info:
            bad.models.list()
        assert info.value.body["code"] == "invalid_api_key"


def test_anthropic_client_with_and_without_the_key(auth_server: Server) -> None:
    """The ``anthropic`` client sends the key as ``x-api-key``; a wrong one is its ``AuthenticationError``."""
    with anthropic.Anthropic(base_url=auth_server.url, api_key=API_KEY, timeout=30.0, max_retries=0) as good:
        assert [m.id for m in good.models.list().data] == [MODEL_NAME]
        message = good.messages.create(model=MODEL_NAME, max_tokens=3, messages=[{"role": "user", "content": "Hi"}],
                                       extra_body={"ignore_eos": True})
        assert message.usage.output_tokens == 3
    with anthropic.Anthropic(base_url=auth_server.url, api_key="wrong", timeout=30.0, max_retries=0) as bad:
        with pytest.raises(anthropic.AuthenticationError) as info:
            bad.messages.create(model=MODEL_NAME, max_tokens=3, messages=[{"role": "user", "content": "Hi"}])
        assert info.value.type == "authentication_error"
        with pytest.raises(anthropic.AuthenticationError):
            bad.models.list()
