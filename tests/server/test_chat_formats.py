"""The tool-call and reasoning formats end to end, on real servers over random-weight models
with the families' templates and control tokens, through the ``openai`` client.

- A Mistral (v11) template with ``[TOOL_CALLS]``/``[ARGS]`` as control tokens: the format is
  detected from the template, a forced call begins with the control token (kept in the text
  for the parser, skipped elsewhere), and comes back as ``tool_calls`` with Mistral's
  nine-character ids, streamed and not; the call history is rendered by the template.
- ``--tool-call-parser llama3_json`` on a ChatML model: forced calls in Llama 3's JSON.
- An R1-style template that opens ``<think>`` for the model: the reply's reasoning comes
  back as ``reasoning_content`` (streamed as its own deltas) and the rest as ``content``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import openai
import pytest
from live_server import TINY_SPEC, Server, serving

from rocmforge.synthetic import random_hf_weights, write_gguf

MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m.role == 'user' %}{% if loop.last and tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]"
    "{% endif %}[INST]{{ m.content }}[/INST]"
    "{% elif m.role == 'assistant' %}{% if m.tool_calls %}{% for c in m.tool_calls %}"
    "[TOOL_CALLS]{{ c.function.name }}[ARGS]{{ c.function.arguments | tojson }}{% endfor %}"
    "{% else %}{{ m.content }}{% endif %}{{ eos_token }}"
    "{% elif m.role == 'tool' %}[TOOL_RESULTS]{{ m.content }}[/TOOL_RESULTS]{% endif %}{% endfor %}"
)
MISTRAL_CONTROL = ("[INST]", "[/INST]", "[TOOL_CALLS]", "[ARGS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                   "[TOOL_RESULTS]", "[/TOOL_RESULTS]")
R1_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n' }}"
    "{% if enable_thinking is false %}{{ '\\n</think>\\n\\n' }}{% endif %}{% endif %}"
    "{# the model closes its reasoning with </think> #}"
)
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 10}}, "required": ["city"]}}}
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]
FORCED = {"tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": False, "max_tokens": 80,
          "temperature": 0.9}


def _server(tmp_path_factory: pytest.TempPathFactory, name: str, *flags: str, **spec: object) -> Iterator[Server]:
    path: Path = tmp_path_factory.mktemp(name) / f"{name}.gguf"
    model_spec = replace(TINY_SPEC, **spec)
    write_gguf(path, model_spec, random_hf_weights(model_spec, seed=11), seed=11)
    yield from serving(path, tmp_path_factory.mktemp(f"{name}-log"), "--model-name", name, *flags)


@pytest.fixture(scope="module")
def mistral(tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    for server in _server(tmp_path_factory, "mistral", chat_template=MISTRAL_TEMPLATE,
                          extra_control_tokens=MISTRAL_CONTROL):
        with openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", timeout=30.0, max_retries=0) as client:
            yield client


@pytest.fixture(scope="module")
def llama3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    for server in _server(tmp_path_factory, "llama3", "--tool-call-parser", "llama3_json",
                          extra_control_tokens=("<|python_tag|>",)):
        with openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", timeout=30.0, max_retries=0) as client:
            yield client


@pytest.fixture(scope="module")
def thinker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    for server in _server(tmp_path_factory, "thinker", chat_template=R1_TEMPLATE):
        with openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", timeout=30.0, max_retries=0) as client:
            yield client


def _streamed_calls(chunks: list) -> list[tuple[str, str, str]]:
    calls: dict[int, list[str]] = {}
    for chunk in chunks:
        for delta in chunk.choices[0].delta.tool_calls or ():
            call = calls.setdefault(delta.index, [delta.id or "", "", ""])
            call[1] += delta.function.name or ""
            call[2] += delta.function.arguments or ""
    return [tuple(c) for _, c in sorted(calls.items())]  # type: ignore[misc]


@pytest.mark.parametrize("seed", [0, 1])
def test_mistral_forced_call(mistral: openai.OpenAI, seed: int) -> None:
    response = mistral.chat.completions.create(model="mistral", messages=MESSAGES, seed=seed, **FORCED)
    [choice] = response.choices
    assert choice.finish_reason == "tool_calls", choice
    for call in choice.message.tool_calls:
        assert len(call.id) == 9 and call.id.isalnum()  # Mistral's templates insist on such ids
        assert call.function.name == "get_weather"
        arguments = json.loads(call.function.arguments)
        assert set(arguments) == {"city"} and len(arguments["city"]) <= 10
    assert choice.message.content is None

    chunks = [c for c in mistral.chat.completions.create(model="mistral", messages=MESSAGES, seed=seed, stream=True,
                                                          **FORCED) if c.choices]
    assert [(n, a) for _, n, a in _streamed_calls(chunks)] == [
        (c.function.name, c.function.arguments) for c in choice.message.tool_calls]
    assert not "".join(c.choices[0].delta.content or "" for c in chunks)  # the markers are no content


def test_mistral_control_tokens_are_kept_only_for_the_parser(mistral: openai.OpenAI) -> None:
    """With ``[TOOL_CALLS]`` pushed by ``logit_bias``: without tools it is skipped like any
    control token; with tools its text reaches the parser (and, with no well-formed call
    after it, the reply is content)."""
    base = str(mistral.base_url).rstrip("/").removesuffix("/v1")
    [marker] = httpx.post(f"{base}/tokenize", json={"prompt": "[TOOL_CALLS]", "add_special_tokens": False},
                          timeout=30).json()["tokens"]
    kwargs = {"model": "mistral", "messages": MESSAGES, "max_tokens": 4, "temperature": 0,
              "logit_bias": {str(marker): 100}}
    plain = mistral.chat.completions.create(**kwargs)
    assert plain.usage.completion_tokens == 4 and plain.choices[0].message.content == ""
    offered = mistral.chat.completions.create(**kwargs, tools=[WEATHER]).choices[0]
    assert offered.message.content == "[TOOL_CALLS]" * 4 and offered.finish_reason == "length"


def test_mistral_tool_round_trip(mistral: openai.OpenAI) -> None:
    first = mistral.chat.completions.create(model="mistral", messages=MESSAGES, seed=2, **FORCED).choices[0].message
    [call] = first.tool_calls[:1]
    history = [*MESSAGES,
               {"role": "assistant", "content": None, "tool_calls": [call.model_dump(exclude_none=True)]},
               {"role": "tool", "tool_call_id": call.id, "content": "21 C"}]
    answer = mistral.chat.completions.create(model="mistral", messages=history, max_tokens=8, temperature=0)
    assert answer.choices[0].message.content is not None
    assert answer.usage.prompt_tokens > 20  # the template rendered the call and its result


def test_llama3_json_forced_call(llama3: openai.OpenAI) -> None:
    response = llama3.chat.completions.create(model="llama3", messages=MESSAGES, seed=0, **FORCED)
    [choice] = response.choices
    assert choice.finish_reason == "tool_calls"
    assert [c.function.name for c in choice.message.tool_calls][:1] == ["get_weather"]
    assert all(c.id.startswith("call_") for c in choice.message.tool_calls)
    chunks = [c for c in llama3.chat.completions.create(model="llama3", messages=MESSAGES, seed=0, stream=True,
                                                         **FORCED) if c.choices]
    assert [(n, a) for _, n, a in _streamed_calls(chunks)] == [
        (c.function.name, c.function.arguments) for c in choice.message.tool_calls]


REASONED = {"max_tokens": 60, "temperature": 0.9, "extra_body": {"regex": "[a-z]{2,8} [a-z]{2,8}\n</think>\n\n[a-z]{2,8}"}}


@pytest.mark.parametrize("seed", [0, 1])
def test_reasoning_content(thinker: openai.OpenAI, seed: int) -> None:
    whole = thinker.chat.completions.create(model="thinker", messages=MESSAGES, seed=seed, **REASONED)
    message = whole.choices[0].message
    reasoning = message.model_extra["reasoning_content"]
    assert reasoning and " " in reasoning and "<think>" not in reasoning and "</think>" not in reasoning
    assert message.content and message.content.isalpha()

    chunks = [c for c in thinker.chat.completions.create(model="thinker", messages=MESSAGES, seed=seed, stream=True,
                                                          **REASONED) if c.choices]
    streamed_reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks)
    streamed_content = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert (streamed_reasoning, streamed_content) == (reasoning, message.content)
    first_content = next(i for i, c in enumerate(chunks) if c.choices[0].delta.content)
    last_reasoning = max(i for i, c in enumerate(chunks) if (c.choices[0].delta.model_extra or {}).get(
        "reasoning_content"))
    assert last_reasoning < first_content


def test_thinking_switched_off_through_the_template(thinker: openai.OpenAI) -> None:
    """``chat_template_kwargs`` reach the template: with the block closed by the prompt, the
    reply is all answer."""
    reply = thinker.chat.completions.create(model="thinker", messages=MESSAGES, max_tokens=6, temperature=0,
                                            extra_body={"regex": "[a-z ]{20,30}",
                                                        "chat_template_kwargs": {"enable_thinking": False}})
    message = reply.choices[0].message
    assert "reasoning_content" not in (message.model_extra or {}) and message.content


@pytest.mark.parametrize("variables", [{"messages": []}, {"bos_token": "x"}, {"not a name": 1},
                                       {"special_tokens_in_content": True}])
def test_reserved_template_variables_are_400s(thinker: openai.OpenAI, variables: dict) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        thinker.chat.completions.create(model="thinker", messages=MESSAGES, max_tokens=2,
                                        extra_body={"chat_template_kwargs": variables})
    assert info.value.body["param"] == "chat_template_kwargs"


def test_template_variables_named_like_the_servers_own_parameters_are_just_variables(thinker: openai.OpenAI) -> None:
    reply = thinker.chat.completions.create(model="thinker", messages=MESSAGES, max_tokens=2,
                                            extra_body={"chat_template_kwargs": {"state": 1, "fn": 2, "render": 3}})
    assert reply.choices[0].finish_reason == "length"


def test_a_reply_cut_off_while_reasoning_is_all_reasoning(thinker: openai.OpenAI) -> None:
    whole = thinker.chat.completions.create(model="thinker", messages=MESSAGES, max_tokens=6, temperature=0,
                                            extra_body={"regex": "[a-z ]{20,30}"})
    message = whole.choices[0].message
    assert whole.choices[0].finish_reason == "length"
    assert message.model_extra["reasoning_content"] and message.content == ""


def _sample(base: str, name: str, labels: dict[str, str]) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(httpx.get(f"{base}/metrics", timeout=30).text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    raise AssertionError(f"{name} {labels} not exported")


def test_tool_calls_and_reasoning_are_counted(mistral: openai.OpenAI, thinker: openai.OpenAI) -> None:
    base = str(mistral.base_url).rstrip("/").removesuffix("/v1")
    calls = _sample(base, "rocmforge_tool_calls_total", {"parser": "mistral"})
    replies = _sample(base, "rocmforge_tool_call_replies_total", {"parser": "mistral"})
    mistral.chat.completions.create(model="mistral", messages=MESSAGES, seed=7, **FORCED)
    for _ in mistral.chat.completions.create(model="mistral", messages=MESSAGES, seed=7, stream=True, **FORCED):
        pass
    mistral.chat.completions.create(model="mistral", messages=MESSAGES, max_tokens=3)  # no tools: not counted
    assert _sample(base, "rocmforge_tool_calls_total", {"parser": "mistral"}) == calls + 2
    assert _sample(base, "rocmforge_tool_call_replies_total", {"parser": "mistral"}) == replies + 2

    base = str(thinker.base_url).rstrip("/").removesuffix("/v1")
    before = _sample(base, "rocmforge_reasoning_replies_total", {})
    thinker.chat.completions.create(model="thinker", messages=MESSAGES, seed=0, **REASONED)
    for _ in thinker.chat.completions.create(model="thinker", messages=MESSAGES, seed=0, stream=True, **REASONED):
        pass
    assert _sample(base, "rocmforge_reasoning_replies_total", {}) == before + 2
    assert _sample(base, "rocmforge_tool_calls_total", {"parser": "hermes"}) == 0


def test_anthropic_thinking_blocks(thinker: openai.OpenAI) -> None:
    """The Messages API reads replies through the same layer: reasoning is a thinking block,
    streamed as thinking deltas, equal to the OpenAI route's reasoning_content (the random
    model never closes its block, so the reply is all reasoning)."""
    import anthropic

    reference = thinker.chat.completions.create(model="thinker", messages=MESSAGES, seed=0, max_tokens=12,
                                                temperature=0.9)
    reasoning = reference.choices[0].message.model_extra["reasoning_content"]
    assert reasoning and reference.choices[0].message.content == ""
    base = str(thinker.base_url).rstrip("/").removesuffix("/v1")
    kwargs = {"model": "thinker", "max_tokens": 12, "messages": MESSAGES,
              "extra_body": {"seed": 0, "temperature": 0.9}}
    with anthropic.Anthropic(base_url=base, api_key="x", max_retries=0) as client:
        message = client.messages.create(**kwargs)
        with client.messages.stream(**kwargs) as stream:
            streamed = stream.get_final_message()
    for reply in (message, streamed):
        assert [b.type for b in reply.content] == ["thinking"] and reply.stop_reason == "max_tokens"
        assert reply.content[0].thinking == reasoning


def test_a_constrained_reply_is_not_read_for_reasoning(thinker: openai.OpenAI) -> None:
    """The prompt opened a think block, but a forced call (or a schema) binds the reply from
    its first token: it is the call, not reasoning."""
    forced = thinker.chat.completions.create(model="thinker", messages=MESSAGES, seed=0, **FORCED).choices[0]
    assert forced.finish_reason == "tool_calls" and "reasoning_content" not in (forced.message.model_extra or {})
    assert [c.function.name for c in forced.message.tool_calls] == ["get_weather"]
    schema = {"type": "object", "properties": {"a": {"enum": ["x", "y"]}}, "required": ["a"]}
    shaped = thinker.chat.completions.create(
        model="thinker", messages=MESSAGES, max_tokens=20, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}).choices[0].message
    assert json.loads(shaped.content)["a"] in ("x", "y") and "reasoning_content" not in (shaped.model_extra or {})
