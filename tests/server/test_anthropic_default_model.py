"""The Messages API the way agent code uses it, on the default model (SmolLM2-135M-Instruct,
greedy) with the official ``anthropic`` client: a plain question ends its turn with the
answer, and a forced tool call names the city asked about, whose result goes back as a
``tool_result`` for a text reply."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anthropic
import pytest
from live_server import Server, serving

pytestmark = pytest.mark.slow
MODEL = "smollm2"
GREEDY = {"temperature": 0}
WEATHER = {"name": "get_weather", "description": "Current weather of a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture(scope="module")
def default_server(default_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from serving(default_gguf, tmp_path_factory.mktemp("anthropic-log"), "--model-name", MODEL)


@pytest.fixture(scope="module")
def claude(default_server: Server) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=default_server.url, api_key="unused", max_retries=0, timeout=60.0) as c:
        yield c


def test_a_question_ends_its_turn_with_the_answer(claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(model=MODEL, max_tokens=32, system="You are a helpful assistant.",
                                     messages=[{"role": "user", "content": "What is the capital of France?"}],
                                     extra_body=GREEDY)
    assert message.stop_reason == "end_turn"
    [block] = message.content
    assert "Paris" in block.text


def test_an_agent_turn_with_a_tool(claude: anthropic.Anthropic) -> None:
    """Ask, get a forced call, send its result back, get a text reply (streamed)."""
    messages: list[dict] = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = claude.messages.create(model=MODEL, max_tokens=100, messages=messages, tools=[WEATHER],
                                   tool_choice={"type": "any", "disable_parallel_tool_use": True}, extra_body=GREEDY)
    assert first.stop_reason == "tool_use"
    [call] = first.content
    assert call.type == "tool_use" and call.name == "get_weather" and call.input == {"city": "Paris"}
    messages += [{"role": "assistant", "content": first.content},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                               "content": '{"temperature_c": 21, "sky": "clear"}'}]}]
    with claude.messages.stream(model=MODEL, max_tokens=40, messages=messages, tools=[WEATHER],
                                extra_body=GREEDY) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert final.stop_reason in ("end_turn", "max_tokens") and streamed.strip()
    assert [b.type for b in final.content] == ["text"] and final.content[0].text == streamed
