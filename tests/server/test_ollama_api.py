"""Ollama's API (``/api/*``) with the official ``ollama`` client against a real server: generate
and chat, streamed (NDJSON) and not, against the OpenAI and native routes' greedy outputs;
``format`` (JSON, a schema), ``options`` (num_predict, seed, stop), ``context``, logprobs; tool
calls in the history through the template; the model listing (tags, show, ps, version, ``/``);
every bad input a 4xx in Ollama's ``{"error": ...}`` shape with the server still serving; the
API key; disconnects; a failure mid-stream. The reply parser (tool calls with object
arguments) and the options mapping are unit-tested in-process."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import pytest
from live_server import (
    API_KEY,
    HTTP_TIMEOUT,
    MODEL_NAME,
    TINY_SPEC,
    Server,
    metric_values,
    serving,
    wait_for_status,
)
from spawned_server import running, spawn_server

from rocmforge.errors import InvalidRequestError
from rocmforge.gguf import read_gguf
from rocmforge.server.chat_output import ChatOutput
from rocmforge.server.ollama_api import ReplyParser
from rocmforge.server.ollama_models import human_number, model_card, tagged
from rocmforge.server.ollama_protocol import ModelBody, Options
from rocmforge.server.reasoning import ReasoningFormat
from rocmforge.server.tool_calls.hermes import CLOSE, OPEN, HermesFormat
from rocmforge.synthetic.spec import CHATML_TEMPLATE

TAGGED = f"{MODEL_NAME}:latest"
PROMPT = "Once upon a time"
MESSAGES = [{"role": "user", "content": "Hello there"}]
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def oll(base_url: str) -> Iterator[ollama.Client]:
    client = ollama.Client(host=base_url, timeout=30.0)
    yield client
    client._client.close()


def _error(response: httpx.Response, status: int) -> str:
    """Ollama's error shape: ``{"error": "<message>"}`` and nothing else, as JSON."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"], body
    return body["error"]


def _ndjson(response: httpx.Response) -> list[dict]:
    assert response.status_code == 200, response.read()
    assert response.headers["content-type"].startswith("application/x-ndjson"), response.headers
    return [json.loads(line) for line in response.iter_lines() if line]


def _native_greedy(client: httpx.Client, prompt: str, max_tokens: int) -> dict:
    response = client.post("/generate", json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    assert response.status_code == 200, response.text
    return response.json()


def _tokens(client: httpx.Client, **body: object) -> list[int]:
    response = client.post("/tokenize", json=body)
    assert response.status_code == 200, response.text
    return response.json()["tokens"]


def _assert_stats(final: dict, prompt_tokens: int, output_tokens: int) -> None:
    assert final["done"] is True
    assert final["prompt_eval_count"] == prompt_tokens and final["eval_count"] == output_tokens, final
    for key in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(final[key], int) and final[key] >= 0, (key, final)
    assert final["prompt_eval_duration"] > 0 and final["eval_duration"] > 0, final
    assert final["total_duration"] >= final["prompt_eval_duration"] + final["eval_duration"], final
    assert final["created_at"].endswith("Z") and "T" in final["created_at"], final


# --- generate ---------------------------------------------------------------------------------------


def test_raw_generate_matches_the_native_greedy_output(oll: ollama.Client, client: httpx.Client) -> None:
    native = _native_greedy(client, PROMPT, 12)
    assert native["finish_reason"] == "length"
    prompt_ids = _tokens(client, prompt=PROMPT)
    response = oll.generate(MODEL_NAME, PROMPT, raw=True, options={**GREEDY, "num_predict": 12})
    assert response.response == native["text"]
    assert response.done_reason == "length" and response.model == TAGGED
    _assert_stats(response.model_dump(), len(prompt_ids), 12)
    assert response.context is None  # raw mode returns no context (as Ollama)


def test_generate_goes_through_the_chat_template_and_returns_its_context(oll: ollama.Client,
                                                                         client: httpx.Client) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}]
    templated = _tokens(client, messages=messages)
    response = oll.generate(TAGGED, PROMPT, system="Be brief.", options={**GREEDY, "num_predict": 8})
    assert response.prompt_eval_count == len(templated)
    assert list(response.context) == templated + list(response.context[len(templated):])
    assert len(response.context) == len(templated) + response.eval_count
    answer = client.post("/detokenize", json={"tokens": list(response.context[len(templated):])}).json()["prompt"]
    assert answer == response.response

    # The deprecated context continues the conversation: its ids come first.
    follow = oll.generate(MODEL_NAME, "And then?", context=response.context, options={**GREEDY, "num_predict": 3})
    next_turn = _tokens(client, messages=[{"role": "user", "content": "And then?"}])
    assert follow.prompt_eval_count == len(response.context) + len(next_turn)
    assert list(follow.context[:len(response.context)]) == list(response.context)


def test_streamed_generate_is_ndjson_that_adds_up_to_the_whole(client: httpx.Client) -> None:
    whole = client.post("/api/generate", json={"model": MODEL_NAME, "prompt": PROMPT, "raw": True, "stream": False,
                                               "options": {**GREEDY, "num_predict": 10}}).json()
    with client.stream("POST", "/api/generate", json={"model": MODEL_NAME, "prompt": PROMPT, "raw": True,
                                                      "options": {**GREEDY, "num_predict": 10}}) as response:
        lines = _ndjson(response)  # stream is true by default
    *deltas, final = lines
    assert deltas and all(line["done"] is False and line["model"] == TAGGED for line in deltas)
    assert "".join(line["response"] for line in deltas) == whole["response"]
    assert final["response"] == "" and final["done_reason"] == "length"
    _assert_stats(final, whole["prompt_eval_count"], 10)


def test_an_empty_prompt_loads_the_model(oll: ollama.Client) -> None:
    response = oll.generate(MODEL_NAME)
    assert (response.done, response.done_reason, response.response) == (True, "load", "")
    chat = oll.chat(MODEL_NAME, messages=[], keep_alive=0)
    assert (chat.done, chat.done_reason, chat.message.content) == (True, "load", "")


# --- chat ---------------------------------------------------------------------------------------------


def test_chat_matches_the_openai_route(oll: ollama.Client, client: httpx.Client) -> None:
    openai = client.post("/v1/chat/completions", json={"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 16,
                                                       "temperature": 0}).json()
    response = oll.chat(MODEL_NAME, MESSAGES, options={**GREEDY, "num_predict": 16}, keep_alive="5m")
    assert response.message.role == "assistant"
    assert response.message.content == openai["choices"][0]["message"]["content"]
    assert response.message.tool_calls is None and response.message.thinking is None
    assert response.done_reason == "length"
    _assert_stats(response.model_dump(), openai["usage"]["prompt_tokens"], 16)


def test_streamed_chat_with_the_client(oll: ollama.Client) -> None:
    whole = oll.chat(MODEL_NAME, MESSAGES, options={**GREEDY, "num_predict": 12})
    parts = list(oll.chat(MODEL_NAME, MESSAGES, stream=True, options={**GREEDY, "num_predict": 12}))
    *deltas, final = parts
    assert all(not p.done and p.message.role == "assistant" for p in deltas)
    assert "".join(p.message.content or "" for p in deltas) == whole.message.content
    assert final.done and final.done_reason == "length" and final.message.content == ""
    assert final.eval_count == 12 and final.prompt_eval_count == whole.prompt_eval_count


def test_seed_makes_sampling_reproducible(oll: ollama.Client) -> None:
    def sample(seed: int) -> str:
        return oll.generate(MODEL_NAME, PROMPT, raw=True,
                            options={"temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": seed,
                                     "num_predict": 8}).response

    first = sample(1234)
    assert sample(1234) == first
    assert any(sample(seed) != first for seed in (1, 2, 3))


def test_stop_strings_end_the_reply(oll: ollama.Client, client: httpx.Client) -> None:
    full = _native_greedy(client, PROMPT, 24)["text"]
    position = next(i for i, ch in enumerate(full) if i >= 2 and ch.isascii() and ch.isalnum() and ch not in full[:i])
    response = oll.generate(MODEL_NAME, PROMPT, raw=True, options={**GREEDY, "num_predict": 24, "stop": [full[position]]})
    assert response.response == full[:position]
    assert response.done_reason == "stop" and response.eval_count < 24


def test_logprobs(client: httpx.Client) -> None:
    body = client.post("/api/generate", json={"model": MODEL_NAME, "prompt": PROMPT, "raw": True, "stream": False,
                                              "logprobs": True, "top_logprobs": 2,
                                              "options": {**GREEDY, "num_predict": 5}}).json()
    entries = body["logprobs"]
    assert len(entries) == 5 and "".join(e["token"] for e in entries) == body["response"]
    for entry in entries:
        assert entry["logprob"] <= 0 and len(entry["top_logprobs"]) == 2
        assert entry["top_logprobs"][0]["logprob"] == pytest.approx(entry["logprob"])  # greedy: the best one
        assert bytes(entry["bytes"]).decode("utf-8", "replace") == entry["token"] or "\ufffd" in entry["token"]


# --- format -------------------------------------------------------------------------------------------

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"]}


def _valid_person(text: str) -> bool:
    value = json.loads(text)
    return (isinstance(value, dict) and set(value) == {"name", "age"} and isinstance(value["name"], str)
            and len(value["name"]) <= 8 and isinstance(value["age"], int) and 0 <= value["age"] <= 120)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_json_format_gives_a_json_object(oll: ollama.Client, seed: int) -> None:
    response = oll.chat(MODEL_NAME, MESSAGES, format="json", options={"seed": seed, "num_predict": 300})
    assert response.done_reason == "stop", response
    assert isinstance(json.loads(response.message.content), dict)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_schema_format_validates(oll: ollama.Client, seed: int) -> None:
    response = oll.generate(MODEL_NAME, "Who?", format=SCHEMA, options={"seed": seed, "num_predict": 300})
    assert response.done_reason == "stop" and _valid_person(response.response), response.response


def test_a_streamed_schema_format_concatenates_to_a_valid_object(oll: ollama.Client) -> None:
    parts = list(oll.chat(MODEL_NAME, MESSAGES, format=SCHEMA, stream=True, options={"seed": 5, "num_predict": 300}))
    assert parts[-1].done and parts[-1].done_reason == "stop"
    assert _valid_person("".join(p.message.content or "" for p in parts))


# --- tools --------------------------------------------------------------------------------------------

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather",
                                                                      "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": '{"temp": 21}', "tool_name": "get_weather"},
]


def test_tool_calls_in_the_history_go_through_the_template(oll: ollama.Client, client: httpx.Client) -> None:
    """The tiny model's ChatML template knows no tool calls: the history is written as Hermes
    text, the call's arguments (an object here) as JSON."""
    rendered = ("<|im_start|>user\nWeather in Paris?<|im_end|>\n"
                '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
                "</tool_call><|im_end|>\n"
                '<|im_start|>user\n<tool_response>\n{"temp": 21}\n</tool_response><|im_end|>\n'
                "<|im_start|>assistant\n")
    expected = _tokens(client, prompt=rendered, add_special_tokens=False)
    response = oll.chat(MODEL_NAME, HISTORY, options={**GREEDY, "num_predict": 1})
    assert response.prompt_eval_count == len(expected)
    # Offered tools are described in a system message the template renders.
    with_tools = oll.chat(MODEL_NAME, HISTORY, tools=[WEATHER], options={**GREEDY, "num_predict": 1})
    assert with_tools.prompt_eval_count > response.prompt_eval_count


RECORDED = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n'
            f'{CLOSE}\n{OPEN}\n{{"name": "get_time", "arguments": {{}}}}\n{CLOSE}')


def test_a_recorded_hermes_reply_becomes_ollama_tool_calls() -> None:
    reply = ReplyParser(ChatOutput(tools=HermesFormat())).whole(RECORDED)
    assert reply.content == "Let me check."
    assert [c["function"] for c in reply.tool_calls] == [
        {"index": 0, "name": "get_weather", "arguments": {"city": "Paris", "days": 2}},
        {"index": 1, "name": "get_time", "arguments": {}},
    ]
    message = reply.message()
    assert message["role"] == "assistant" and "thinking" not in message
    # The client validates it: arguments are an object.
    parsed = ollama.Message(**message)
    assert parsed.tool_calls[0].function.arguments == {"city": "Paris", "days": 2}
    # Without tools offered, the same text is content.
    assert ReplyParser(ChatOutput()).whole(RECORDED).content == RECORDED


@pytest.mark.parametrize("piece", [1, 3, 7, 1000])
def test_a_streamed_hermes_reply_sends_content_then_the_calls(piece: int) -> None:
    parser = ReplyParser(ChatOutput(tools=HermesFormat()))
    sent = "".join(parser.feed(RECORDED[i:i + piece]).content for i in range(0, len(RECORDED), piece))
    rest = parser.finish(RECORDED)
    assert sent + rest.content == "Let me check."
    assert [c["function"]["name"] for c in rest.tool_calls] == ["get_weather", "get_time"]
    assert rest.tool_calls[0]["function"]["arguments"] == {"city": "Paris", "days": 2}


@pytest.mark.parametrize("piece", [1, 4, 1000])
def test_reasoning_becomes_thinking(piece: int) -> None:
    text = "<think>\nThe user wants the weather.\n</think>\n\n" + RECORDED
    output = ChatOutput(reasoning=ReasoningFormat(), tools=HermesFormat())
    whole = ReplyParser(output).whole(text)
    assert whole.thinking == "The user wants the weather." and whole.content == "Let me check."
    assert whole.message()["thinking"] == whole.thinking and len(whole.tool_calls) == 2
    parser = ReplyParser(output)
    pieces = [parser.feed(text[i:i + piece]) for i in range(0, len(text), piece)]
    rest = parser.finish(text)
    assert "".join(p.thinking or "" for p in [*pieces, rest]) == whole.thinking
    assert "".join(p.content for p in [*pieces, rest]) == "Let me check."
    assert [c["function"] for c in rest.tool_calls] == [c["function"] for c in whole.tool_calls]


def test_think_on_a_model_without_reasoning_is_a_400(client: httpx.Client) -> None:
    response = client.post("/api/chat", json={"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}],
                                              "think": True, "stream": False})
    assert response.status_code == 400 and "does not support thinking" in response.json()["error"]
    off = client.post("/api/chat", json={"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}],
                                         "think": False, "stream": False, "options": {"num_predict": 2}})
    assert off.status_code == 200, off.text


def test_text_that_is_no_tool_call_stays_content() -> None:
    text = f"{OPEN} not json {CLOSE}"
    parser = ReplyParser(ChatOutput(tools=HermesFormat()))
    sent = parser.feed(text).content
    rest = parser.finish(text)
    assert sent + rest.content == text and rest.tool_calls == []
    assert ReplyParser(ChatOutput(tools=HermesFormat())).whole(text).content == text


# --- options ------------------------------------------------------------------------------------------


def test_options_map_onto_the_sampling_fields() -> None:
    defaults = Options().sampling_kwargs()
    assert defaults == {"temperature": 0.8, "top_k": 40, "top_p": 0.9}  # Ollama's defaults
    mapped = Options(temperature=0.2, top_k=5, top_p=0.5, min_p=0.1, seed=9, stop=["\n"], repeat_penalty=1.3,
                     presence_penalty=0.5, frequency_penalty=0.25, repeat_last_n=-1, num_ctx=2048, num_thread=3,
                     mirostat=0, typical_p=1.0, tfs_z=1.0).sampling_kwargs()
    assert mapped == {"temperature": 0.2, "top_k": 5, "top_p": 0.5, "min_p": 0.1, "seed": 9, "stop": ["\n"],
                      "repetition_penalty": 1.3, "presence_penalty": 0.5, "frequency_penalty": 0.25}
    assert "seed" not in Options(seed=-1).sampling_kwargs()  # -1: random
    off = Options(repeat_penalty=1.3, frequency_penalty=1.0, repeat_last_n=0).sampling_kwargs()
    assert "repetition_penalty" not in off and "frequency_penalty" not in off  # 0: no penalties
    assert Options(repeat_last_n=64).sampling_kwargs() == defaults  # no penalty: the window has no effect


def test_parameter_sizes_as_ollama_writes_them() -> None:
    assert [human_number(n) for n in (8_030_261_248, 7_000_000_000, 134_515_008, 135_000_000, 115_392, 999)] == [
        "8.0B", "7B", "134.52M", "135M", "115K", "999"]
    assert tagged("llama3") == "llama3:latest" and tagged("llama3:8b") == "llama3:8b"


# --- the model: tags, show, ps, version, / ---------------------------------------------------------


def test_list_show_and_ps(oll: ollama.Client, client: httpx.Client, tiny_gguf: Path) -> None:
    with read_gguf(tiny_gguf) as gguf:
        parameters = sum(t.n_elements for t in gguf.tensors.values())
        vocabulary = len(gguf.metadata["tokenizer.ggml.tokens"])
    details = {"parent_model": "", "format": "gguf", "family": "llama", "families": ["llama"],
               "parameter_size": f"{round(parameters / 1000)}K", "quantization_level": "F32"}
    [listed] = oll.list().models
    assert listed.model == TAGGED and listed.size == tiny_gguf.stat().st_size
    assert listed.details.model_dump() == details and len(listed.digest) == 64

    shown = oll.show(MODEL_NAME)
    assert shown.template == CHATML_TEMPLATE and shown.capabilities == ["completion"]
    assert shown.details.model_dump() == details
    info = shown.modelinfo
    assert info["general.architecture"] == "llama" and info["general.parameter_count"] == parameters
    assert info["llama.context_length"] == TINY_SPEC.max_context
    assert info["tokenizer.ggml.tokens"] == [] and "tokenizer.chat_template" not in info
    assert oll.show(TAGGED).details == shown.details
    verbose = client.post("/api/show", json={"model": MODEL_NAME, "verbose": True}).json()
    assert len(verbose["model_info"]["tokenizer.ggml.tokens"]) == vocabulary

    [loaded] = oll.ps().models
    assert loaded.model == loaded.name == TAGGED and loaded.context_length == TINY_SPEC.max_context
    assert loaded.expires_at.year == 9999 and loaded.size > 0 and loaded.size_vram == 0  # the CPU


@pytest.mark.slow
def test_the_default_models_card(default_gguf: Path) -> None:
    """A quantized file: its level from ``general.file_type``, its size as Ollama writes it."""
    with read_gguf(default_gguf) as gguf:
        parameters = sum(t.n_elements for t in gguf.tensors.values())
        template = gguf.metadata["tokenizer.chat_template"]
    card = model_card(str(default_gguf), "smollm2", template)
    assert card.name == "smollm2:latest" and card.accepts("smollm2") and not card.accepts("smollm2:q8")
    assert card.details["quantization_level"] == "Q4_1" and card.details["family"] == "llama"
    assert card.details["parameter_size"] == f"{parameters / 1e6:.2f}M"
    assert card.template == template and card.model_info["llama.block_count"] == 30
    assert card.model_info["general.size_label"] == "135M"


def test_version_and_the_probe(client: httpx.Client) -> None:
    version = client.get("/api/version").json()
    assert [int(part) for part in version["version"].split(".")] >= [0, 5, 0]
    for method in ("GET", "HEAD"):
        probe = client.request(method, "/")
        assert probe.status_code == 200 and probe.headers["content-type"].startswith("text/plain")
    assert client.get("/").text == "Ollama is running"


def test_pulling_the_served_model_succeeds(oll: ollama.Client) -> None:
    assert oll.pull(MODEL_NAME).status == "success"
    assert [p.status for p in oll.pull(TAGGED, stream=True)] == ["success"]


# --- errors -----------------------------------------------------------------------------------------

CHAT = {"model": MODEL_NAME, "messages": MESSAGES, "stream": False, "options": {"num_predict": 2}}
GEN = {"model": MODEL_NAME, "prompt": PROMPT, "stream": False, "options": {"num_predict": 2}}
BAD: list[tuple[str, str, dict, int, str]] = [
    ("POST", "/api/chat", {**CHAT, "model": "nope"}, 404, "model 'nope' not found"),
    ("POST", "/api/generate", {**GEN, "model": "llama3:8b"}, 404, "model 'llama3:8b' not found"),
    ("POST", "/api/show", {"model": "nope"}, 404, "model 'nope' not found"),
    ("POST", "/api/chat", {"messages": MESSAGES}, 400, "model is required"),
    ("POST", "/api/generate", {"prompt": "x"}, 400, "model is required"),
    ("POST", "/api/chat", {**CHAT, "messages": [{"role": "user", "content": "x", "images": ["aGVsbG8="]}]}, 400,
     "messages.0.images"),
    ("POST", "/api/generate", {**GEN, "images": ["aGVsbG8="]}, 400, "images"),
    ("POST", "/api/generate", {**GEN, "suffix": "return x"}, 400, "suffix"),
    ("POST", "/api/generate", {**GEN, "template": "{{ .Prompt }}"}, 400, "template"),
    ("POST", "/api/generate", {**GEN, "raw": True, "system": "x"}, 400, "system"),
    ("POST", "/api/chat", {**CHAT, "options": {"temperature": "hot"}}, 400, "options.temperature"),
    ("POST", "/api/chat", {**CHAT, "options": {"num_predict": "5"}}, 400, "options.num_predict"),
    ("POST", "/api/chat", {**CHAT, "options": {"num_predict": 0}}, 400, "num_predict"),
    ("POST", "/api/chat", {**CHAT, "options": {"temprature": 0.5}}, 400, "options.temprature: unknown field"),
    ("POST", "/api/chat", {**CHAT, "options": {"mirostat": 2}}, 400, "mirostat"),
    ("POST", "/api/chat", {**CHAT, "options": {"repeat_penalty": 1.2, "repeat_last_n": 64}}, 400, "repeat_last_n"),
    ("POST", "/api/chat", {**CHAT, "options": {"temperature": -1}}, 400, "options.temperature: temperature must be"),
    ("POST", "/api/chat", {**CHAT, "options": {"repeat_penalty": 0}}, 400, "options.repeat_penalty: repeat_penalty"),
    ("POST", "/api/chat", {**CHAT, "options": {"stop": [""]}}, 400, "options.stop"),
    ("POST", "/api/chat", {**CHAT, "options": {"seed": -5}}, 400, "seed"),
    ("POST", "/api/chat", {**CHAT, "options": []}, 400, "options"),
    ("POST", "/api/chat", {**CHAT, "format": "yaml"}, 400, "format"),
    ("POST", "/api/chat", {**CHAT, "format": {"type": "integer", "minimum": 5, "maximum": 3}}, 400, "format"),
    ("POST", "/api/generate", {**GEN, "format": {"$ref": "#/$defs/nowhere"}}, 400, "format"),
    ("POST", "/api/chat", {**CHAT, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role"),
    ("POST", "/api/chat", {**CHAT, "messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content"),
    ("POST", "/api/chat", {**CHAT, "messages": [{"role": "user", "tool_calls": [
        {"function": {"name": "f", "arguments": {}}}]}]}, 400, "tool_calls"),
    ("POST", "/api/chat", {**CHAT, "messages": [{"role": "assistant", "tool_calls": [
        {"function": {"name": "f", "arguments": "{}"}}]}]}, 400, "arguments"),
    ("POST", "/api/chat", {**CHAT, "messages": "hello"}, 400, "messages"),
    ("POST", "/api/chat", {**CHAT, "tools": [{"type": "function", "function": {"name": "bad name!"}}]}, 400, "tools"),
    ("POST", "/api/chat", {**CHAT, "stream": "yes"}, 400, "stream"),
    ("POST", "/api/chat", {**CHAT, "keep_alive": "forever"}, 400, "keep_alive"),
    ("POST", "/api/chat", {**CHAT, "think": "maximal"}, 400, "think"),
    ("POST", "/api/generate", {**GEN, "context": [10**6]}, 400, "vocabulary"),
    ("POST", "/api/generate", {**GEN, "top_logprobs": 99, "logprobs": True}, 400, "top_logprobs"),
    ("POST", "/api/pull", {"model": "llama3"}, 403, "serves 'tiny-server:latest' only"),
    ("POST", "/api/push", {"model": TAGGED}, 403, "cannot push"),
    ("POST", "/api/create", {"model": "mine", "from": TAGGED}, 403, "cannot create"),
    ("POST", "/api/copy", {"source": TAGGED, "destination": "copy"}, 403, "cannot copy"),
    ("DELETE", "/api/delete", {"model": TAGGED}, 403, "cannot delete"),
]


@pytest.mark.parametrize("method, path, body, status, words", BAD, ids=[f"{b[1]}-{b[4][:24]}" for b in BAD])
def test_bad_requests_are_4xx_in_ollamas_shape(client: httpx.Client, method: str, path: str, body: dict,
                                               status: int, words: str) -> None:
    message = _error(client.request(method, path, json=body), status)
    assert words in message, message
    after = client.post("/api/generate", json=GEN)  # the server keeps serving
    assert after.status_code == 200 and after.json()["eval_count"] >= 1, after.text


def test_the_body_is_json_whatever_its_content_type(client: httpx.Client) -> None:
    """``curl -d '{...}'`` (Ollama's documented examples) sends JSON as a form."""
    form = {"content-type": "application/x-www-form-urlencoded"}
    response = client.post("/api/chat", content=json.dumps(CHAT), headers=form)
    assert response.status_code == 200 and response.json()["done"] is True, response.text
    assert "model is required" in _error(client.post("/api/show", content=b"", headers=form), 400)


def test_bad_json_and_the_client_errors(oll: ollama.Client, client: httpx.Client) -> None:
    assert "not valid JSON" in _error(client.post("/api/chat", content=b"{not json",
                                                  headers={"content-type": "application/json"}), 400)
    with pytest.raises(ollama.ResponseError) as info:
        oll.chat("nope", MESSAGES)
    assert (info.value.status_code, info.value.error) == (404, "model 'nope' not found")
    with pytest.raises(ollama.ResponseError) as info:
        list(oll.generate(MODEL_NAME, PROMPT, stream=True, options={"mirostat": 1}))
    assert info.value.status_code == 400 and "mirostat" in info.value.error


def test_no_api_route_answered_5xx(client: httpx.Client) -> None:
    """After every test above: the HTTP metrics label /api routes by their template, and
    none of them answered with a 5xx."""
    from prometheus_client.parser import text_string_to_metric_families

    samples = [s for family in text_string_to_metric_families(client.get("/metrics").text) for s in family.samples
               if s.name == "rocmforge_http_requests_total"]
    api = [s for s in samples if s.labels["route"].startswith("/api/")]
    assert {s.labels["route"] for s in api} >= {"/api/chat", "/api/generate", "/api/show", "/api/tags"}
    assert not [s for s in api if s.labels["status"].startswith("5")], api
    assert metric_values(client)["rocmforge_requests_running"] == 0


# --- disconnects, the API key, a failure mid-stream ---------------------------------------------------


LONG = {"type": "string", "minLength": 3000}
"""A format that keeps even the tiny model writing (no end of sequence before 3000 characters)."""


def test_leaving_a_stream_cancels_the_request(client: httpx.Client) -> None:
    body = {"model": MODEL_NAME, "prompt": PROMPT, "raw": True, "format": LONG, "options": {"num_predict": 4000}}
    with httpx.Client(base_url=str(client.base_url), timeout=HTTP_TIMEOUT) as leaver, \
            leaver.stream("POST", "/api/generate", json=body, headers={"X-Request-Id": "ollama-leaves"}) as response:
        first = json.loads(next(response.iter_lines()))
        assert first["done"] is False
    status = wait_for_status(client, "ollama-leaves", lambda s: s["state"] == "finished")
    assert status["finish_reason"] == "cancelled" and status["num_generated_tokens"] < 3000, status


def test_leaving_before_the_answer_cancels_the_request(client: httpx.Client) -> None:
    body = {**GEN, "raw": True, "format": LONG, "options": {"num_predict": 4000}}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{client.base_url}/api/generate", json=body, headers={"X-Request-Id": "ollama-gives-up"},
                   timeout=httpx.Timeout(1.0))
    status = wait_for_status(client, "ollama-gives-up", lambda s: s["state"] == "finished")
    assert status["finish_reason"] == "cancelled" and status["num_generated_tokens"] < 3000, status


def test_the_api_key(auth_server: Server) -> None:
    good = ollama.Client(host=auth_server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30.0)
    assert good.chat(MODEL_NAME, MESSAGES, options={"num_predict": 2}).done
    bad = ollama.Client(host=auth_server.url, timeout=30.0)
    with pytest.raises(ollama.ResponseError) as info:
        bad.list()
    assert info.value.status_code == 401 and info.value.error == "missing or invalid API key"
    response = httpx.post(f"{auth_server.url}/api/chat", json=CHAT, timeout=HTTP_TIMEOUT)
    assert _error(response, 401) == "missing or invalid API key"
    assert response.headers["www-authenticate"] == "Bearer"


def test_a_body_too_large_is_413_in_ollamas_shape(client: httpx.Client) -> None:
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * (2 << 20)}]}
    assert "request body over" in _error(client.post("/api/chat", json=big), 413)


@pytest.fixture(scope="module")
def faulty_server(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Requests whose id starts with ``boom`` fail in the model's forward pass."""
    with running(spawn_server(tiny_gguf, tmp_path_factory.mktemp("ollama-faulty"),
                              env={"ROCMFORGE_FAULT_INJECT": "forward_error:boom"})) as server:
        yield server


def test_a_failure_is_an_error_line_mid_stream_and_a_500_otherwise(faulty_server: Server) -> None:
    with httpx.Client(base_url=faulty_server.url, timeout=HTTP_TIMEOUT) as client:
        with client.stream("POST", "/api/chat", json={**CHAT, "stream": True},
                           headers={"X-Request-Id": "boom-stream"}) as response:
            lines = _ndjson(response)
        assert len(lines) == 1 and set(lines[0]) == {"error"}, lines
        assert "injected forward fault" in lines[0]["error"]
        assert "injected forward fault" in _error(client.post("/api/chat", json=CHAT,
                                                              headers={"X-Request-Id": "boom-plain"}), 500)
        started = time.monotonic()
        after = client.post("/api/chat", json=CHAT, headers={"X-Request-Id": "fine-after"})
        assert after.status_code == 200 and after.json()["done"], after.text
        assert time.monotonic() - started < 30
    failing = ollama.Client(host=faulty_server.url, headers={"X-Request-Id": "boom-client"}, timeout=30.0)
    with pytest.raises(ollama.ResponseError, match="injected forward fault"):
        list(failing.chat(MODEL_NAME, MESSAGES, stream=True, options={"num_predict": 2}))


def test_unsupported_samplers_are_refused_and_a_model_name_is_required() -> None:
    with pytest.raises(ValueError, match="typical_p"):
        Options(typical_p=0.5)
    with pytest.raises(InvalidRequestError, match="model is required"):
        ModelBody().model_name()


# --- the default model --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_server(default_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from serving(default_gguf, tmp_path_factory.mktemp("ollama-default"), "--model-name", "smollm2")


@pytest.mark.slow
def test_the_default_model_answers_through_ollamas_api(default_server: Server) -> None:
    client = ollama.Client(host=default_server.url, timeout=120.0)
    question = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    answer = client.chat("smollm2:latest", question, options={**GREEDY, "num_predict": 16})
    assert "Paris" in answer.message.content, answer.message.content
    streamed = "".join(p.message.content or "" for p in client.chat("smollm2", question, stream=True,
                                                                    options={**GREEDY, "num_predict": 16}))
    assert streamed == answer.message.content
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
              "required": ["city", "country"]}
    where = client.generate("smollm2", "Where is the Eiffel Tower? Reply in JSON.", format=schema,
                            options={**GREEDY, "num_predict": 100})
    value = json.loads(where.response)
    assert set(value) == {"city", "country"} and "Paris" in value["city"], value


def test_the_openapi_schema_describes_the_ollama_bodies(client: httpx.Client) -> None:
    """The routes read their bodies by hand (any content type, as Ollama does); the schema
    still describes them, and every reference in it resolves."""
    schema = client.get("/openapi.json").json()
    components = schema["components"]["schemas"]
    for path, model in [("/api/generate", "GenerateBody"), ("/api/chat", "ChatBody"), ("/api/embed", "EmbedBody"),
                        ("/api/show", "ModelBody")]:
        body = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{model}"}
    assert {"model", "messages", "tools", "format", "options", "think"} <= set(components["ChatBody"]["properties"])
    refs: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            refs.extend([node["$ref"]] if "$ref" in node else [])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    assert refs and all(ref.removeprefix("#/components/schemas/") in components for ref in refs)
