"""OpenAI compatibility of a real server, driven by the official ``openai`` client."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest
from live_server import MODEL_NAME, TINY_SPEC

PROMPT = "Once upon a time"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, world!"}]
IGNORE_EOS = {"ignore_eos": True}


@pytest.fixture(scope="module")
def oai(base_url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="x", timeout=30.0, max_retries=0) as c:
        yield c


def _prompt_tokens(client: httpx.Client, **body: object) -> int:
    response = client.post("/tokenize", json=body)
    assert response.status_code == 200, response.text
    return response.json()["count"]


def _native_greedy(client: httpx.Client, prompt: str, max_tokens: int) -> dict:
    response = client.post("/generate", json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                                              "ignore_eos": True})
    assert response.status_code == 200, response.text
    return response.json()


def test_models_list(oai: openai.OpenAI) -> None:
    models = oai.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert models.data[0].object == "model"
    assert models.data[0].owned_by == "rocmforge"


def test_completion_matches_native_generate_and_counts_usage(oai: openai.OpenAI, client: httpx.Client) -> None:
    completion = oai.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=10, temperature=0,
                                        extra_body=IGNORE_EOS)
    assert completion.object == "text_completion"
    assert completion.model == MODEL_NAME
    [choice] = completion.choices
    assert choice.index == 0
    assert choice.finish_reason == "length"
    assert choice.text == _native_greedy(client, PROMPT, 10)["text"]
    prompt_tokens = _prompt_tokens(client, prompt=PROMPT)
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == prompt_tokens
    assert completion.usage.completion_tokens == 10
    assert completion.usage.total_tokens == prompt_tokens + 10


def test_logit_bias_bans_and_forces_tokens(oai: openai.OpenAI, client: httpx.Client) -> None:
    greedy = client.post("/generate", json={"prompt": PROMPT, "max_tokens": 3, "temperature": 0,
                                            "ignore_eos": True}).json()["token_ids"]
    forced = next(t for t in range(100, 200) if t not in greedy)
    native = client.post("/generate", json={"prompt": PROMPT, "max_tokens": 3, "temperature": 0, "ignore_eos": True,
                                            "logit_bias": {str(forced): 100}}).json()
    assert native["token_ids"] == [forced] * 3
    completion = oai.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=3, temperature=0,
                                        logit_bias={str(forced): 100}, extra_body=IGNORE_EOS)
    assert completion.choices[0].text == native["text"]
    banned = client.post("/generate", json={"prompt": PROMPT, "max_tokens": 1, "temperature": 0,
                                            "logit_bias": {str(greedy[0]): -100}}).json()
    assert banned["token_ids"][0] != greedy[0]
    chat = oai.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=1, temperature=0,
                                       logprobs=True, logit_bias={str(forced): 100})
    assert chat.choices[0].logprobs.content[0].logprob < 0  # the model's own probability of it


def test_usage_counts_prompt_tokens_served_from_the_prefix_cache(oai: openai.OpenAI) -> None:
    prompt = "A prompt no other test sends, long enough to fill whole KV blocks: " + "one two three " * 12
    first = oai.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    again = oai.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=2, temperature=0)
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < again.usage.prompt_tokens  # whole blocks; the last token is always computed
    stream = oai.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=2, temperature=0, stream=True,
                                    stream_options={"include_usage": True})
    usage = [chunk.usage for chunk in stream if chunk.usage is not None]
    assert [u.prompt_tokens_details.cached_tokens for u in usage] == [cached]
    messages = [{"role": "user", "content": prompt}]
    oai.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=1)
    chat = oai.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=1)
    assert chat.usage.prompt_tokens_details.cached_tokens > 0


def test_completion_without_model_field(client: httpx.Client) -> None:
    """``model`` is optional: the served model answers."""
    response = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
    assert response.status_code == 200, response.text
    assert response.json()["model"] == MODEL_NAME


def test_streamed_completion_concatenates_to_the_non_streamed_text(oai: openai.OpenAI, client: httpx.Client) -> None:
    expected = oai.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=0,
                                      extra_body=IGNORE_EOS)
    chunks = list(oai.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                         stream_options={"include_usage": True}, extra_body=IGNORE_EOS))
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == expected.choices[0].text
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert all(c.id == chunks[0].id and c.object == "text_completion" for c in chunks)
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert usage_chunk.usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"}) == \
        expected.usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"})


def test_streamed_completion_without_include_usage_has_no_usage_chunk(oai: openai.OpenAI) -> None:
    chunks = list(oai.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=4, temperature=0, stream=True,
                                         extra_body=IGNORE_EOS))
    assert chunks and all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)


def test_n_choices(oai: openai.OpenAI, client: httpx.Client) -> None:
    greedy = oai.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=6, temperature=0, n=2,
                                    extra_body=IGNORE_EOS)
    assert [c.index for c in greedy.choices] == [0, 1]
    assert greedy.choices[0].text == greedy.choices[1].text == _native_greedy(client, PROMPT, 6)["text"]
    prompt_tokens = _prompt_tokens(client, prompt=PROMPT)
    # The prompt counts once; both choices' tokens count.
    assert greedy.usage.prompt_tokens == prompt_tokens
    assert greedy.usage.completion_tokens == 12
    assert greedy.usage.total_tokens == prompt_tokens + 12

    sampled = oai.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=16, temperature=1.0, n=2, seed=11,
                                     extra_body=IGNORE_EOS)
    assert [c.index for c in sampled.choices] == [0, 1]
    # Choice i is sampled with seed + i: two different samples, each reproducible.
    assert sampled.choices[0].text != sampled.choices[1].text
    again = oai.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=16, temperature=1.0, n=2, seed=11,
                                   extra_body=IGNORE_EOS)
    assert [c.text for c in again.choices] == [c.text for c in sampled.choices]


def test_streamed_n_choices_concatenate_per_index(oai: openai.OpenAI) -> None:
    expected = oai.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=1.0, n=2, seed=5,
                                      extra_body=IGNORE_EOS)
    texts = ["", ""]
    for chunk in oai.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=1.0, n=2, seed=5,
                                        stream=True, extra_body=IGNORE_EOS):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == [c.text for c in expected.choices]


def test_seed_makes_sampling_reproducible(oai: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        completion = oai.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=16, temperature=1.0,
                                            seed=seed, extra_body=IGNORE_EOS)
        return completion.choices[0].text

    first = sample(1234)
    assert sample(1234) == first
    assert sample(4321) != first


def test_stop_string_truncates_the_text(oai: openai.OpenAI, client: httpx.Client) -> None:
    full = _native_greedy(client, PROMPT, 24)["text"]
    # A printable ASCII character that first occurs a few characters in.
    position = next(i for i, ch in enumerate(full) if i >= 2 and ch.isascii() and ch.isalnum() and ch not in full[:i])
    stop = full[position]
    completion = oai.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop],
                                        extra_body=IGNORE_EOS)
    [choice] = completion.choices
    assert choice.text == full[:position]
    assert choice.finish_reason == "stop"
    assert completion.usage.completion_tokens < 24


def test_logprobs(oai: openai.OpenAI, client: httpx.Client) -> None:
    completion = oai.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2,
                                        extra_body=IGNORE_EOS)
    native = client.post("/generate", json={"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "logprobs": 2,
                                            "ignore_eos": True}).json()["logprobs"]
    [choice] = completion.choices
    logprobs = choice.logprobs
    assert logprobs is not None
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 6
    assert "".join(logprobs.tokens) == choice.text or "\ufffd" in choice.text  # split UTF-8 decodes per token
    assert logprobs.text_offset == sorted(logprobs.text_offset) and logprobs.text_offset[0] == 0
    for token_logprob, top, entry in zip(logprobs.token_logprobs, logprobs.top_logprobs, native, strict=True):
        assert token_logprob <= 0
        # Keyed by token text: the two best alternatives' texts (two that decode alike
        # collapse into one key).
        assert set(top) == {alt["token"] for alt in entry["top"]} and len(entry["top"]) == 2
        # Greedy: the chosen token is the best alternative.
        assert max(top.values()) == pytest.approx(token_logprob, abs=1e-5)


def test_echo_prepends_the_prompt(oai: openai.OpenAI, client: httpx.Client) -> None:
    completion = oai.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=5, temperature=0, echo=True,
                                        extra_body=IGNORE_EOS)
    assert completion.choices[0].text == PROMPT + _native_greedy(client, PROMPT, 5)["text"]
    chunks = list(oai.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=5, temperature=0, echo=True,
                                         stream=True, extra_body=IGNORE_EOS))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == completion.choices[0].text


def test_chat_completion_and_stream_with_usage(oai: openai.OpenAI, client: httpx.Client) -> None:
    chat = oai.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=10, temperature=0,
                                       extra_body=IGNORE_EOS)
    assert chat.object == "chat.completion"
    [choice] = chat.choices
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason == "length"
    prompt_tokens = _prompt_tokens(client, messages=MESSAGES)
    assert chat.usage.prompt_tokens == prompt_tokens
    assert chat.usage.completion_tokens == 10
    assert chat.usage.total_tokens == prompt_tokens + 10

    chunks = list(oai.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=10, temperature=0,
                                              stream=True, stream_options={"include_usage": True},
                                              extra_body=IGNORE_EOS))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == choice.message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert (usage_chunk.usage.prompt_tokens, usage_chunk.usage.completion_tokens, usage_chunk.usage.total_tokens) == \
        (prompt_tokens, 10, prompt_tokens + 10)


def test_chat_max_completion_tokens_and_default_length(oai: openai.OpenAI, client: httpx.Client) -> None:
    chat = oai.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_completion_tokens=3, temperature=0,
                                       extra_body=IGNORE_EOS)
    assert chat.usage.completion_tokens == 3
    # Without max_tokens the answer may fill the context, within the server's default cap.
    long = oai.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, temperature=0, extra_body=IGNORE_EOS)
    assert 3 < long.usage.completion_tokens <= TINY_SPEC.max_context - _prompt_tokens(client, messages=MESSAGES)


def test_unknown_model_is_404_model_not_found(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        oai.completions.create(model="gpt-4o", prompt=PROMPT, max_tokens=2)
    assert info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=2)


def test_bad_request_surfaces_as_openai_error(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        oai.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=2, temperature=-1)
    assert info.value.body["param"] == "temperature"
    assert info.value.body["code"] == "invalid_request"


def test_tool_call_history_is_accepted_and_bad_tool_messages_name_the_field(client: httpx.Client) -> None:
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    ]
    response = client.post("/v1/chat/completions", json={"messages": history, "max_tokens": 2})
    assert response.status_code == 200, response.text
    bad = [*history[:1], {**history[1], "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{"}}]}]
    response = client.post("/v1/chat/completions", json={"messages": bad, "max_tokens": 2})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "messages.1.tool_calls.0.function.arguments", error
    assert "JSON text" in error["message"]
