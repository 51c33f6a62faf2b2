"""Anthropic's Messages API (``/v1/messages``, ``/v1/messages/count_tokens``, ``/v1/models``
with ``anthropic-version``) on a real server, driven by the official ``anthropic`` client.

The oracles are independent of the route under test: the OpenAI chat route and ``/tokenize``
render the same conversation through the same template (so the greedy text and the token
counts must agree), the SDK's own stream accumulator assembles the streamed message, and tool
inputs are checked against their schemas by hand (``jsonschema`` is not installed).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from httpx_sse import connect_sse
from live_server import (
    HTTP_TIMEOUT,
    LONG_MAX_TOKENS,
    MODEL_NAME,
    Server,
    assert_anthropic_error,
    wait_for_status,
    wait_until_idle,
)
from spawned_server import running, spawn_server

GREEDY = {"temperature": 0, "ignore_eos": True}
"""Greedy, and exactly ``max_tokens`` tokens (the random model may sample its EOS early)."""
HEADERS = {"anthropic-version": "2023-06-01"}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {"name": "get_weather", "description": "Current weather of a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                              "unit": {"enum": ["c", "f"]}},
                            "required": ["city", "unit"]}}
CLOCK = {"name": "get_time", "input_schema": {"type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}},
                                              "required": ["zone"]}}


@pytest.fixture(scope="module")
def claude(base_url: str) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=base_url, api_key="unused", max_retries=0, timeout=30.0) as c:
        yield c


@pytest.fixture(scope="module")
def oai(base_url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=30.0) as c:
        yield c


def _valid_input(name: str, tool_input: Any) -> bool:
    """The input validates against the tool's ``input_schema`` (checked by hand)."""
    if name == "get_weather":
        return (isinstance(tool_input, dict) and set(tool_input) == {"city", "unit"}
                and isinstance(tool_input["city"], str) and len(tool_input["city"]) <= 12
                and tool_input["unit"] in ("c", "f"))
    return name == "get_time" and tool_input in ({"zone": "utc"}, {"zone": "cet"})


def _chat_text(oai: openai.OpenAI, messages: list[dict], max_tokens: int, **extra: Any) -> str:
    """The same conversation's greedy reply through the OpenAI chat route."""
    response = oai.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=max_tokens,
                                           temperature=0, extra_body={"ignore_eos": True}, **extra)
    return response.choices[0].message.content or ""


# --- creating messages ---------------------------------------------------------------------------


def test_create_answers_a_message(claude: anthropic.Anthropic, oai: openai.OpenAI) -> None:
    message = claude.messages.create(model=MODEL_NAME, max_tokens=8, messages=USER, extra_body=GREEDY)
    assert message.type == "message" and message.role == "assistant" and message.model == MODEL_NAME
    assert message.id.startswith("msg_")
    [block] = message.content
    assert block.type == "text" and block.text == _chat_text(oai, USER, 8)
    assert message.stop_reason == "max_tokens" and message.stop_sequence is None
    assert message.usage.output_tokens == 8
    counted = claude.messages.count_tokens(model=MODEL_NAME, messages=USER).input_tokens
    assert message.usage.input_tokens + message.usage.cache_read_input_tokens == counted
    assert message.usage.cache_creation_input_tokens == 0


def test_multi_turn_with_a_system_prompt(claude: anthropic.Anthropic, oai: openai.OpenAI,
                                         client: httpx.Client) -> None:
    turns = [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi. How can I help?"},
             {"role": "user", "content": [{"type": "text", "text": "Tell me"}, {"type": "text", "text": "a story."}]}]
    system = [{"type": "text", "text": "You are terse."}, {"type": "text", "text": "Answer in English."}]
    message = claude.messages.create(model=MODEL_NAME, max_tokens=6, system=system, messages=turns,
                                     extra_body=GREEDY)
    # Text blocks are joined by newlines; the system prompt leads the conversation.
    same = [{"role": "system", "content": "You are terse.\nAnswer in English."}, turns[0], turns[1],
            {"role": "user", "content": "Tell me\na story."}]
    assert message.content[0].text == _chat_text(oai, same, 6)
    tokens = client.post("/tokenize", json={"messages": same}).json()["tokens"]
    assert claude.messages.count_tokens(model=MODEL_NAME, system=system, messages=turns).input_tokens == len(tokens)
    # Consecutive turns of one role are one turn, as Anthropic combines them.
    split = [turns[0], turns[1], {"role": "user", "content": "Tell me"}, {"role": "user", "content": "a story."}]
    again = claude.messages.create(model=MODEL_NAME, max_tokens=6, system=system, messages=split, extra_body=GREEDY)
    assert again.content[0].text == message.content[0].text


def test_stop_sequences_end_the_message(claude: anthropic.Anthropic) -> None:
    messages = [{"role": "user", "content": "Count with me: one, two,"}]
    free = claude.messages.create(model=MODEL_NAME, max_tokens=16, messages=messages, extra_body=GREEDY)
    text = free.content[0].text
    start = next(i for i in range(len(text) // 2, len(text) - 1) if text[i:i + 2].strip())
    stop = text[start:start + 2]
    stopped = claude.messages.create(model=MODEL_NAME, max_tokens=16, messages=messages, extra_body=GREEDY,
                                     stop_sequences=["never-written-#", stop])
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == stop
    assert [b.text for b in stopped.content] == ([text[:text.find(stop)]] if text.find(stop) else [])
    assert stopped.usage.output_tokens < 16
    unmatched = claude.messages.create(model=MODEL_NAME, max_tokens=16, messages=messages, extra_body=GREEDY,
                                       stop_sequences=["never-written-#"])
    assert unmatched.stop_reason == "max_tokens" and unmatched.stop_sequence is None
    assert unmatched.content[0].text == text


def test_a_complete_structured_answer_ends_the_turn(claude: anthropic.Anthropic) -> None:
    schema = {"type": "object", "properties": {"sunny": {"type": "boolean"}}, "required": ["sunny"]}
    message = claude.messages.create(model=MODEL_NAME, max_tokens=30, messages=USER, extra_body={"temperature": 0},
                                     output_config={"format": {"type": "json_schema", "schema": schema}})
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    answer = json.loads(message.content[0].text)
    assert set(answer) == {"sunny"} and isinstance(answer["sunny"], bool)


# --- streaming -----------------------------------------------------------------------------------


def test_stream_helper_assembles_the_message(claude: anthropic.Anthropic) -> None:
    kwargs: dict[str, Any] = {"model": MODEL_NAME, "max_tokens": 10, "messages": USER, "extra_body": GREEDY}
    whole = claude.messages.create(**kwargs)
    with claude.messages.stream(**kwargs) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) > 1 and "".join(pieces) == whole.content[0].text
    assert final.id.startswith("msg_") and final.model == MODEL_NAME
    assert [b.model_dump() for b in final.content] == [b.model_dump() for b in whole.content]
    assert (final.stop_reason, final.stop_sequence) == ("max_tokens", None)
    assert final.usage.output_tokens == 10
    assert final.usage.input_tokens + final.usage.cache_read_input_tokens == (
        whole.usage.input_tokens + whole.usage.cache_read_input_tokens)


def test_stream_events_in_order(client: httpx.Client) -> None:
    body = {"model": MODEL_NAME, "max_tokens": 4, "messages": USER, "stream": True, **GREEDY}
    with connect_sse(client, "POST", "/v1/messages", json=body, headers=HEADERS) as source:
        assert source.response.headers["content-type"].startswith("text/event-stream")
        events = [(e.event, e.json()) for e in source.iter_sse()]
    names = [name for name, _ in events]
    deltas = names.count("content_block_delta")
    assert names == ["message_start", "ping", "content_block_start", *["content_block_delta"] * deltas,
                     "content_block_stop", "message_delta", "message_stop"], names
    assert all(data["type"] == name for name, data in events)
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["usage"]["output_tokens"] == 0
    assert events[2][1] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == 4


# --- tools ---------------------------------------------------------------------------------------


def test_a_named_tool_choice_calls_that_tool(claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(model=MODEL_NAME, max_tokens=100, messages=USER, tools=[WEATHER, CLOCK],
                                     tool_choice={"type": "tool", "name": "get_time",
                                                  "disable_parallel_tool_use": True},
                                     extra_body={"temperature": 0})
    assert message.stop_reason == "tool_use" and message.stop_sequence is None
    [call] = message.content
    assert call.type == "tool_use" and call.name == "get_time" and call.id.startswith("call_")
    assert _valid_input(call.name, call.input), call


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_any_tool_choice_forces_valid_calls(claude: anthropic.Anthropic, seed: int) -> None:
    message = claude.messages.create(model=MODEL_NAME, max_tokens=200, messages=USER, tools=[WEATHER, CLOCK],
                                     tool_choice={"type": "any"}, extra_body={"temperature": 1.0, "seed": seed})
    assert message.stop_reason == "tool_use"
    assert message.content and all(block.type == "tool_use" for block in message.content)
    assert len({block.id for block in message.content}) == len(message.content)
    for block in message.content:
        assert _valid_input(block.name, block.input), block


def test_streamed_tool_use_equals_the_whole_answer(claude: anthropic.Anthropic) -> None:
    kwargs: dict[str, Any] = {"model": MODEL_NAME, "max_tokens": 100, "messages": USER, "tools": [WEATHER],
                              "tool_choice": {"type": "any"}, "extra_body": {"temperature": 0.8, "seed": 4}}
    whole = claude.messages.create(**kwargs)
    partial: dict[int, str] = {}
    with claude.messages.stream(**kwargs) as stream:
        for event in stream:
            if event.type == "content_block_delta" and event.delta.type == "input_json_delta":
                partial[event.index] = partial.get(event.index, "") + event.delta.partial_json
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert [(b.type, b.name, b.input) for b in final.content] == [(b.type, b.name, b.input) for b in whole.content]
    assert [json.loads(partial[i]) for i in sorted(partial)] == [b.input for b in final.content]
    assert all(_valid_input(b.name, b.input) for b in final.content)


def test_a_tool_conversation_round_trips_through_the_template(claude: anthropic.Anthropic,
                                                              oai: openai.OpenAI) -> None:
    first = claude.messages.create(model=MODEL_NAME, max_tokens=100, messages=USER, tools=[WEATHER],
                                   tool_choice={"type": "tool", "name": "get_weather",
                                                "disable_parallel_tool_use": True},
                                   extra_body={"temperature": 0})
    [call] = first.content
    assert call.type == "tool_use"
    result = '{"temperature_c": 21, "sky": "clear"}'
    conversation = [*USER, {"role": "assistant", "content": [b.model_dump() for b in first.content]},
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": result}]}]
    second = claude.messages.create(model=MODEL_NAME, max_tokens=8, messages=conversation, tools=[WEATHER],
                                    extra_body=GREEDY)
    assert second.stop_reason == "max_tokens" and [b.type for b in second.content] == ["text"]
    # The OpenAI route, given the same history in its own form, writes the same reply.
    tools = [{"type": "function", "function": {"name": WEATHER["name"], "description": WEATHER["description"],
                                               "parameters": WEATHER["input_schema"]}}]
    same = [*USER, {"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": json.dumps(call.input)}}]},
        {"role": "tool", "tool_call_id": call.id, "content": result}]
    assert second.content[0].text == _chat_text(oai, same, 8, tools=tools)
    counted = claude.messages.count_tokens(model=MODEL_NAME, messages=conversation, tools=[WEATHER]).input_tokens
    chat = oai.chat.completions.create(model=MODEL_NAME, messages=same, tools=tools, max_tokens=1)
    assert counted == chat.usage.prompt_tokens


def test_without_a_call_the_reply_stays_text(claude: anthropic.Anthropic) -> None:
    plain = claude.messages.create(model=MODEL_NAME, max_tokens=12, messages=USER, tools=[WEATHER],
                                   extra_body=GREEDY)
    none = claude.messages.create(model=MODEL_NAME, max_tokens=12, messages=USER, tools=[WEATHER],
                                  tool_choice={"type": "none"}, extra_body=GREEDY)
    for message in (plain, none):  # the random model writes no <tool_call>
        assert [b.type for b in message.content] == ["text"] and message.stop_reason == "max_tokens"
    assert plain.content[0].text == none.content[0].text


# --- counting, models ----------------------------------------------------------------------------


def test_count_tokens_is_the_prompt_length(claude: anthropic.Anthropic, client: httpx.Client) -> None:
    counted = claude.messages.count_tokens(model=MODEL_NAME, messages=USER, system="Be brief.")
    tokens = client.post("/tokenize", json={"messages": [{"role": "system", "content": "Be brief."}, *USER]})
    assert counted.input_tokens == len(tokens.json()["tokens"]) > 0
    with_tools = claude.messages.count_tokens(model=MODEL_NAME, messages=USER, tools=[WEATHER]).input_tokens
    assert with_tools > claude.messages.count_tokens(model=MODEL_NAME, messages=USER).input_tokens


def test_prefix_cache_reads_are_counted_apart(claude: anthropic.Anthropic) -> None:
    messages = [{"role": "user", "content": "A prompt no other test sends, long enough for whole KV blocks: "
                                            + "one two three " * 12}]
    counted = claude.messages.count_tokens(model=MODEL_NAME, messages=messages).input_tokens
    first = claude.messages.create(model=MODEL_NAME, max_tokens=2, messages=messages, extra_body=GREEDY)
    again = claude.messages.create(model=MODEL_NAME, max_tokens=2, messages=messages, extra_body=GREEDY)
    assert first.usage.cache_read_input_tokens == 0 and first.usage.input_tokens == counted
    assert 0 < again.usage.cache_read_input_tokens < counted
    assert again.usage.input_tokens + again.usage.cache_read_input_tokens == counted


def test_models_list_in_both_shapes(claude: anthropic.Anthropic, oai: openai.OpenAI, client: httpx.Client) -> None:
    [model] = claude.models.list().data
    assert model.id == MODEL_NAME and model.type == "model" and model.display_name == MODEL_NAME
    openai_shape = client.get("/v1/models").json()  # no anthropic-version header: OpenAI's shape
    assert openai_shape["object"] == "list"
    assert model.max_input_tokens == openai_shape["data"][0]["max_model_len"]
    assert int(model.created_at.timestamp()) == openai_shape["data"][0]["created"]
    assert [m.id for m in oai.models.list().data] == [MODEL_NAME]


# --- bad input -----------------------------------------------------------------------------------

BAD_BODIES = {
    "missing-max-tokens": {"model": MODEL_NAME, "messages": USER},
    "zero-max-tokens": {"model": MODEL_NAME, "max_tokens": 0, "messages": USER},
    "empty-messages": {"model": MODEL_NAME, "max_tokens": 4, "messages": []},
    "image-block": {"model": MODEL_NAME, "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}]}]},
    "document-block": {"model": MODEL_NAME, "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "x"}}]}]},
    "first-message-assistant": {"model": MODEL_NAME, "max_tokens": 4, "messages": [
        {"role": "assistant", "content": "Hi"}, *USER]},
    "prefill": {"model": MODEL_NAME, "max_tokens": 4, "messages": [*USER, {"role": "assistant", "content": "It is"}]},
    "empty-text": {"model": MODEL_NAME, "max_tokens": 4, "messages": [{"role": "user", "content": ""}]},
    "tool-choice-missing-tool": {"model": MODEL_NAME, "max_tokens": 4, "messages": USER, "tools": [WEATHER],
                                 "tool_choice": {"type": "tool", "name": "nope"}},
    "tool-choice-any-without-tools": {"model": MODEL_NAME, "max_tokens": 4, "messages": USER,
                                      "tool_choice": {"type": "any"}},
    "input-schema-not-an-object": {"model": MODEL_NAME, "max_tokens": 4, "messages": USER,
                                   "tools": [{"name": "f", "input_schema": {"type": "string"}}]},
    "input-schema-missing": {"model": MODEL_NAME, "max_tokens": 4, "messages": USER, "tools": [{"name": "f"}]},
    "input-schema-does-not-compile": {"model": MODEL_NAME, "max_tokens": 4, "messages": USER, "tool_choice": {"type": "any"},
                                      "tools": [{"name": "f", "input_schema": {"type": "object", "properties": {
                                          "n": {"type": "integer", "minimum": 3, "maximum": 1}}, "required": ["n"]}}]},
    "duplicate-tools": {"model": MODEL_NAME, "max_tokens": 4, "messages": USER, "tools": [WEATHER, WEATHER]},
    "server-tool": {"model": MODEL_NAME, "max_tokens": 4, "messages": USER,
                    "tools": [{"type": "web_search_20250305", "name": "web_search"}]},
    "tool-result-without-tool-use": {"model": MODEL_NAME, "max_tokens": 4, "messages": [
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_x", "content": "1"}]}]},
    "tool-use-in-a-user-turn": {"model": MODEL_NAME, "max_tokens": 4, "messages": [
        {"role": "user", "content": [{"type": "tool_use", "id": "toolu_x", "name": "f", "input": {}}]}]},
    "temperature-above-one": {"model": MODEL_NAME, "max_tokens": 4, "messages": USER, "temperature": 1.5},
    "unknown-field": {"model": MODEL_NAME, "max_tokens": 4, "messages": USER, "frequency_penalty": 1},
    "thinking-budget-over-max-tokens": {"model": MODEL_NAME, "max_tokens": 2000, "messages": USER,
                                        "thinking": {"type": "enabled", "budget_tokens": 4000}},
    "structured-and-forced-tool": {"model": MODEL_NAME, "max_tokens": 4, "messages": USER, "tools": [WEATHER],
                                   "tool_choice": {"type": "any"},
                                   "output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}}},
    "over-the-context": {"model": MODEL_NAME, "max_tokens": 100_000, "messages": USER},
}


@pytest.mark.parametrize("body", BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_bad_requests_are_400s_in_anthropic_shape(client: httpx.Client, body: dict) -> None:
    response = client.post("/v1/messages", json=body, headers=HEADERS)
    assert_anthropic_error(response, 400, "invalid_request_error")


def test_bad_input_through_the_sdk(claude: anthropic.Anthropic, client: httpx.Client) -> None:
    with pytest.raises(anthropic.NotFoundError) as not_found:
        claude.messages.create(model="claude-opus-4-1", max_tokens=4, messages=USER)
    assert not_found.value.type == "not_found_error" and "claude-opus-4-1" in (not_found.value.api_message or "")
    with pytest.raises(anthropic.BadRequestError) as bad:
        claude.messages.create(model=MODEL_NAME, max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}}]}])
    assert bad.value.type == "invalid_request_error" and "image" in (bad.value.api_message or "")
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.count_tokens(model=MODEL_NAME, messages=[])
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.count_tokens(model="nope", messages=USER)
    invalid_json = client.post("/v1/messages", content=b"{not json", headers={**HEADERS,
                                                                              "content-type": "application/json"})
    assert_anthropic_error(invalid_json, 400, "invalid_request_error")
    assert_anthropic_error(client.post("/v1/messages/nowhere", json={}), 404, "not_found_error")
    assert_anthropic_error(client.get("/v1/messages"), 405, "invalid_request_error")
    too_big = client.post("/v1/messages", content=b"x" * ((1 << 20) + 1), headers={"content-type": "application/json"})
    assert_anthropic_error(too_big, 413, "request_too_large")
    # Nothing above got a 5xx or leaked: the server is idle and keeps serving.
    values = wait_until_idle(client)
    assert values["rocmforge_requests_running"] == 0 and values["rocmforge_kv_cache_usage_ratio"] == 0, values
    after = claude.messages.create(model=MODEL_NAME, max_tokens=3, messages=USER, extra_body=GREEDY)
    assert after.usage.output_tokens == 3


# --- disconnects ---------------------------------------------------------------------------------

LONG = {"model": MODEL_NAME, "max_tokens": LONG_MAX_TOKENS, "messages": USER, **GREEDY}


def _assert_cancelled_and_idle(client: httpx.Client, request_id: str) -> None:
    status = wait_for_status(client, request_id, lambda b: b.get("state") == "finished", timeout=3.0)
    assert status.get("finish_reason") == "cancelled", status
    assert 0 < status["num_generated_tokens"] < LONG_MAX_TOKENS, status
    values = wait_until_idle(client, timeout=3.0)
    assert values["rocmforge_requests_running"] == 0 and values["rocmforge_kv_cache_usage_ratio"] == 0, values


def test_a_disconnect_mid_stream_cancels(client: httpx.Client, base_url: str) -> None:
    request_id = "anthropic-disconnect-stream"
    with httpx.Client(base_url=base_url, timeout=httpx.Timeout(10.0, connect=5.0)) as streaming:
        with connect_sse(streaming, "POST", "/v1/messages", json={**LONG, "stream": True},
                         headers={**HEADERS, "X-Request-Id": request_id}) as source:
            for event in source.iter_sse():
                if event.event == "content_block_delta":
                    break
    _assert_cancelled_and_idle(client, request_id)


def test_giving_up_on_a_message_cancels(client: httpx.Client, base_url: str) -> None:
    request_id = "anthropic-disconnect-plain"
    impatient = httpx.Timeout(connect=5.0, read=0.5, write=5.0, pool=5.0)
    with httpx.Client(base_url=base_url, timeout=impatient) as quitter:
        with pytest.raises(httpx.ReadTimeout):
            quitter.post("/v1/messages", json=LONG, headers={**HEADERS, "X-Request-Id": request_id})
    _assert_cancelled_and_idle(client, request_id)


# --- a failing generation ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def faulty_server(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Requests whose id starts with ``boom`` fail in the forward pass."""
    with running(spawn_server(tiny_gguf, tmp_path_factory.mktemp("anthropic-faulty"),
                              env={"ROCMFORGE_FAULT_INJECT": "forward_error:boom"})) as server:
        yield server


def test_a_failed_generation_is_an_api_error(faulty_server: Server) -> None:
    body = {"model": MODEL_NAME, "max_tokens": 4, "messages": USER}
    with httpx.Client(base_url=faulty_server.url, timeout=HTTP_TIMEOUT, headers=HEADERS) as client:
        failed = client.post("/v1/messages", json=body, headers={"X-Request-Id": "boom-plain"})
        assert "injected forward fault" in assert_anthropic_error(failed, 500, "api_error")
        with connect_sse(client, "POST", "/v1/messages", json={**body, "stream": True},
                         headers={"X-Request-Id": "boom-stream"}) as source:
            events = [(e.event, e.json()) for e in source.iter_sse()]
        assert [name for name, _ in events] == ["message_start", "ping", "error"], events
        error = events[-1][1]
        assert error["type"] == "error" and error["error"]["type"] == "api_error"
        assert "injected forward fault" in error["error"]["message"]
        with anthropic.Anthropic(base_url=faulty_server.url, api_key="unused", max_retries=0, timeout=30.0) as sdk:
            with pytest.raises(anthropic.APIStatusError) as raised:
                for _ in sdk.messages.create(model=MODEL_NAME, max_tokens=4, messages=USER, stream=True,
                                             extra_headers={"X-Request-Id": "boom-sdk"}):
                    pass
            assert raised.value.type == "api_error"
            after = sdk.messages.create(model=MODEL_NAME, max_tokens=3, messages=USER, extra_body=GREEDY)
            assert after.usage.output_tokens == 3
