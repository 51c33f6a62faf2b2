"""The tool-call formats (Hermes, Llama 3 JSON, Mistral in both generations): parsing recorded
outputs, streaming (content and OpenAI tool_calls deltas) equal to the whole parse under
every chunking, arguments streamed piece by piece, the grammar that forces calls (compiled
on the tiny vocabulary), the history and tools prompt written for templates without tools,
and detection from chat templates."""

from __future__ import annotations

import json
import random

import pytest
from whole_output import accepts_whole

from rocmforge.errors import InvalidGrammarError
from rocmforge.gguf import read_gguf
from rocmforge.server.tool_calls import ToolCallStream, ToolFormat, detect_tool_format, history, tool_format
from rocmforge.server.tool_calls.hermes import HermesFormat
from rocmforge.server.tool_calls.llama3 import Llama3JsonFormat
from rocmforge.server.tool_calls.mistral import MistralFormat
from rocmforge.structured import StructuredOutput
from rocmforge.structured.compiler import GrammarCompiler
from rocmforge.synthetic import SyntheticSpec, random_hf_weights, write_gguf
from rocmforge.tokenizer import Tokenizer

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}
PARIS, ROME = '{"city": "Paris"}', '{"city": "Rome, \\"Italy\\" {x}"}'

HERMES = HermesFormat()
LLAMA3 = Llama3JsonFormat()
MISTRAL = MistralFormat()
MISTRAL_ARGS = MistralFormat(args_marker=True)

H1 = f'<tool_call>\n{{"name": "get_weather", "arguments": {PARIS}}}\n</tool_call>'
H2 = f'<tool_call>\n{{"name": "get_weather", "arguments": {ROME}}}\n</tool_call>'

# (format, output, content, [(name, arguments text)]): outputs as the families' models write them.
CASES = [
    (HERMES, "plain answer", "plain answer", []),
    (HERMES, H1, None, [("get_weather", PARIS)]),
    (HERMES, "Let me look. " + H1 + "\n" + H2, "Let me look.", [("get_weather", PARIS), ("get_weather", ROME)]),
    (HERMES, '<tool_call>\n{"name": "get_time"}\n</tool_call>', None, [("get_time", "{}")]),
    (HERMES, '<tool_call>\n{"arguments": {}, "name": "get_time"}\n</tool_call>', None, [("get_time", "{}")]),
    (HERMES, f'<tool_call>\n{{"name": "get_weather", "arguments": {PARIS}}}', None, [("get_weather", PARIS)]),
    (HERMES, "<tool_call>\n{not json}\n</tool_call>", "<tool_call>\n{not json}\n</tool_call>", []),
    (HERMES, '<tool_call>\n{"arguments": {}}\n</tool_call>', '<tool_call>\n{"arguments": {}}\n</tool_call>', []),
    (HERMES, '<tool_call>\n{"name": "x", "arguments": [1]}\n</tool_call>',
     '<tool_call>\n{"name": "x", "arguments": [1]}\n</tool_call>', []),
    (HERMES, '<tool_call>\n{"name": "x"', '<tool_call>\n{"name": "x"', []),  # cut off: no call
    (HERMES, "a < sign and <tool", "a < sign and <tool", []),
    (HERMES, "  Indented.\n\n" + H1, "  Indented.", [("get_weather", PARIS)]),
    (HERMES, "trailing space  ", "trailing space  ", []),
    (LLAMA3, f'{{"name": "get_weather", "parameters": {PARIS}}}', None, [("get_weather", PARIS)]),
    (LLAMA3, f'<|python_tag|>{{"name": "get_weather", "arguments": {PARIS}}}', None, [("get_weather", PARIS)]),
    (LLAMA3, f'{{"name": "get_weather", "parameters": {PARIS}}}; {{"name": "get_time", "parameters": {{}}}}', None,
     [("get_weather", PARIS), ("get_time", "{}")]),
    (LLAMA3, 'The answer is {"name": "x", "parameters": {}}', 'The answer is {"name": "x", "parameters": {}}', []),
    (LLAMA3, '{"answer": 42}', '{"answer": 42}', []),
    (LLAMA3, '{"name": "x", "parameters": {}} trailing', '{"name": "x", "parameters": {}} trailing', []),
    (LLAMA3, f'{{"name": "get_weather", "parameters": {PARIS}, "arguments": {{"b": 2}}}}', None,
     [("get_weather", PARIS)]),  # two argument keys: the first counts
    (MISTRAL, f'[TOOL_CALLS] [{{"name": "get_weather", "arguments": {PARIS}}}]', None, [("get_weather", PARIS)]),
    (MISTRAL, f'Sure.[TOOL_CALLS][{{"name": "get_weather", "arguments": {PARIS}}}, '
              f'{{"name": "get_weather", "arguments": {ROME}, "id": "abcdefghi"}}]', "Sure.",
     [("get_weather", PARIS), ("get_weather", ROME)]),
    (MISTRAL, f"[TOOL_CALLS]get_weather[ARGS]{PARIS}[TOOL_CALLS]get_time[ARGS]{{}}", None,
     [("get_weather", PARIS), ("get_time", "{}")]),
    (MISTRAL, f"[TOOL_CALLS]get_weather[CALL_ID]a1b2c3d4e[ARGS]{ROME}", None, [("get_weather", ROME)]),
    (MISTRAL, "[TOOL_CALLS]get weather[ARGS]{}", "[TOOL_CALLS]get weather[ARGS]{}", []),
    (MISTRAL, "[TOOL_CALLS]f[ARGS]{", "[TOOL_CALLS]f[ARGS]{", []),
    (MISTRAL, "no [TOOL_CALL here", "no [TOOL_CALL here", []),
]
IDS = [f"{fmt.name}{'-args' if getattr(fmt, 'args_marker', False) else ''}-{i}" for i, (fmt, *_) in enumerate(CASES)]


@pytest.mark.parametrize("fmt, text, content, calls", CASES, ids=IDS)
def test_parse(fmt: ToolFormat, text: str, content: str | None, calls: list[tuple[str, str]]) -> None:
    got_content, got_calls = fmt.parse(text)
    assert got_content == content
    assert [(c.name, c.arguments) for c in got_calls] == calls
    assert all(isinstance(json.loads(c.arguments), dict) for c in got_calls)
    assert len({c.id for c in got_calls}) == len(got_calls)


def _chunkings(text: str, count: int = 30) -> list[list[str]]:
    rng = random.Random(text)
    out = [list(text)]  # one character at a time
    for _ in range(count):
        cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(1, 12))))
        out.append([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])])
    return out


def _accumulate(deltas: list[dict], calls: dict[int, dict]) -> None:
    """What an OpenAI client does with tool_calls deltas."""
    for delta in deltas:
        call = calls.setdefault(delta["index"], {"id": None, "name": "", "arguments": ""})
        if "id" in delta:
            assert call["id"] is None, "a call is announced once"
            call["id"] = delta["id"]
            assert delta["type"] == "function"
        call["name"] += delta["function"].get("name", "")
        call["arguments"] += delta["function"].get("arguments", "")


@pytest.mark.parametrize("fmt, text, content, calls", CASES, ids=IDS)
def test_streamed_content_and_calls_equal_the_whole_parse(fmt: ToolFormat, text: str, content: str | None,
                                                          calls: list[tuple[str, str]]) -> None:
    for pieces in _chunkings(text):
        stream = ToolCallStream(fmt)
        sent, streamed = "", {}
        for piece in pieces:
            content_piece, deltas = stream.feed(piece)
            sent += content_piece
            _accumulate(deltas, streamed)
        rest, deltas, final = stream.finish(text)
        sent += rest
        _accumulate(deltas, streamed)
        if calls:
            assert sent == (content or "")
            assert [(c["name"], c["arguments"]) for _, c in sorted(streamed.items())] == calls
            assert [(c.name, c.arguments, c.id) for c in final] == [
                (c["name"], c["arguments"], c["id"]) for _, c in sorted(streamed.items())]
        else:
            assert sent == text and not final


def test_arguments_stream_as_they_are_written() -> None:
    """Token by token, a call is announced once its name is whole and its arguments follow
    in pieces before the call is complete."""
    arguments = json.dumps({"city": "Paris", "days": [1, 2, 3], "note": "a long note " * 4})
    text = f'<tool_call>\n{{"name": "get_weather", "arguments": {arguments}}}\n</tool_call>'
    stream = ToolCallStream(HERMES)
    pieces = []
    for i in range(0, len(text), 3):
        _, deltas = stream.feed(text[i:i + 3])
        pieces += [d["function"].get("arguments", "") for d in deltas if d["function"].get("arguments")]
        if i + 3 < text.index('"arguments"'):
            assert not deltas  # the name is not whole yet
    assert len(pieces) > 10 and "".join(pieces) == arguments


def test_arguments_nested_past_the_parsers_depth_are_no_call() -> None:
    deep = "[" * 5000 + "]" * 5000
    text = f'<tool_call>\n{{"name": "f", "arguments": {{"a": {deep}}}}}\n</tool_call>'
    assert HERMES.parse(text) == (text, [])


def test_mistral_call_ids_are_nine_letters_and_digits() -> None:
    _, calls = MISTRAL.parse(f"[TOOL_CALLS]get_weather[ARGS]{PARIS}")
    assert len(calls[0].id) == 9 and calls[0].id.isalnum()
    _, calls = HERMES.parse(H1)
    assert calls[0].id.startswith("call_")


# --- forcing grammars ---------------------------------------------------------------------

CONTROL = ("[TOOL_CALLS]", "[ARGS]", "<|python_tag|>")


@pytest.fixture(scope="module")
def control_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """The tiny vocabulary with Mistral's and Llama's markers as control tokens."""
    spec = SyntheticSpec(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, extra_control_tokens=CONTROL)
    path = tmp_path_factory.mktemp("tool-formats") / "control.gguf"
    write_gguf(path, spec, random_hf_weights(spec, seed=3), seed=3)
    with read_gguf(path) as gguf:
        return Tokenizer.from_gguf_metadata(gguf.metadata)


@pytest.mark.parametrize("fmt", [HERMES, LLAMA3, MISTRAL, MISTRAL_ARGS], ids=lambda f: f"{f.name}{getattr(f, 'args_marker', '')}")
def test_forcing_grammar(fmt: ToolFormat, compiler: GrammarCompiler, tokenizer: Tokenizer) -> None:
    both = fmt.grammar([WEATHER, TIME], True, tokenizer)
    one = fmt.grammar([WEATHER, TIME], False, tokenizer)
    weather, time = ("get_weather", {"city": "Paris"}), ("get_time", {})

    def accepts(grammar: str, text: str) -> bool:
        return accepts_whole(compiler, tokenizer, StructuredOutput(grammar=grammar), text)

    assert accepts(both, fmt.render_calls([weather]))
    assert accepts(both, fmt.render_calls([weather, time]))
    assert accepts(one, fmt.render_calls([time]))
    assert not accepts(one, fmt.render_calls([weather, time]))
    assert not accepts(both, fmt.render_calls([("get_wether", {"city": "Paris"})]))
    assert not accepts(both, fmt.render_calls([("get_weather", {"town": "Paris"})]))
    assert not accepts(both, fmt.render_calls([("get_weather", {"city": "Paris", "extra": 1})]))
    assert not accepts(both, "Sure! " + fmt.render_calls([weather]))
    # what the grammar lets through parses back into the calls
    _, calls = fmt.parse(fmt.render_calls([weather, time]))
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [weather, time]


@pytest.mark.parametrize("fmt", [MISTRAL, MISTRAL_ARGS], ids=["array", "args"])
def test_mistral_grammar_uses_the_control_token(fmt: MistralFormat, control_tokenizer: Tokenizer) -> None:
    """With ``[TOOL_CALLS]`` a control token, the forced reply begins with that token, not
    its spelling in plain text; the detokenized reply (markers kept) parses."""
    compiler = GrammarCompiler(control_tokenizer)
    grammar = fmt.grammar([WEATHER], False, control_tokenizer)
    text = fmt.render_calls([("get_weather", {"city": "Paris"})])
    as_control = control_tokenizer.encode(text, parse_special=True)
    as_plain = control_tokenizer.encode(text, parse_special=False)
    assert control_tokenizer.token_to_id("[TOOL_CALLS]") in as_control
    matcher = compiler.matcher(StructuredOutput(grammar=grammar))
    assert all(matcher.accept(t) for t in as_control)
    assert matcher.is_finished or any(matcher.allows(t) for t in control_tokenizer.stop_ids)
    plain = compiler.matcher(StructuredOutput(grammar=grammar))
    assert not plain.accept(as_plain[0])
    _, calls = fmt.parse(control_tokenizer.decode(as_control))
    assert [c.name for c in calls] == ["get_weather"]


def test_a_tool_whose_parameters_cannot_be_satisfied_does_not_compile(compiler: GrammarCompiler,
                                                                      tokenizer: Tokenizer) -> None:
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "integer", "minimum": 2, "maximum": 1}}}
    with pytest.raises(InvalidGrammarError, match="unsatisfiable"):
        compiler.matcher(StructuredOutput(grammar=HERMES.grammar([bad], True, tokenizer)))


# --- prompts, history and detection --------------------------------------------------------

@pytest.mark.parametrize("fmt", [HERMES, LLAMA3, MISTRAL_ARGS], ids=lambda f: f.name)
def test_tools_prompt_lists_every_tool_and_shows_the_format(fmt: ToolFormat) -> None:
    prompt = fmt.tools_prompt([WEATHER, TIME])
    assert json.dumps(WEATHER) in prompt and json.dumps(TIME) in prompt
    assert fmt.render_calls([("<function-name>", {"<argument>": "<value>"})]) in prompt


@pytest.mark.parametrize("fmt", [HERMES, LLAMA3, MISTRAL, MISTRAL_ARGS], ids=lambda f: f.name)
def test_history_written_out_for_templates_without_tool_support(fmt: ToolFormat) -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [call, call]},
        {"role": "tool", "content": "21", "tool_call_id": "c1"},
        {"role": "tool", "content": "22", "tool_call_id": "c1"},
        {"role": "assistant", "content": "Warm."},
    ]
    written = history(messages, fmt)
    assert written == [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": fmt.render_calls([("get_weather", {"city": "Paris"})] * 2)},
        {"role": "user", "content": "<tool_response>\n21\n</tool_response>\n<tool_response>\n22\n</tool_response>"},
        {"role": "assistant", "content": "Warm."},
    ]
    _, calls = fmt.parse(written[1]["content"])  # the model's own format, read back
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})] * 2


LLAMA31_SNIPPET = ("{{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}{%- if tools is not none %}"
                   "Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name "
                   "and its value}.{%- endif %}{{- '<|python_tag|>' }}")


@pytest.mark.parametrize("source, name, args_marker", [
    (None, "hermes", None),
    ("{% for m in messages %}<|im_start|>{{ m.content }}{% endfor %}", "hermes", None),
    ("{% if tools %}<tools>{{ tools }}</tools>{% endif %}<tool_call>", "hermes", None),
    (LLAMA31_SNIPPET, "llama3_json", None),
    ("<|start_header_id|>{{ messages }}", "hermes", None),  # a Llama 3 template without tools
    ("[AVAILABLE_TOOLS] {{ tools }}[/AVAILABLE_TOOLS][TOOL_CALLS] {{ calls }}", "mistral", False),
    ("[AVAILABLE_TOOLS]{{ tools }}[/AVAILABLE_TOOLS][TOOL_CALLS]{{ name }}[ARGS]{{ args }}", "mistral", True),
])
def test_detected_from_the_template(source: str | None, name: str, args_marker: bool | None) -> None:
    fmt = detect_tool_format(source)
    assert fmt.name == name
    if args_marker is not None:
        assert isinstance(fmt, MistralFormat) and fmt.args_marker is args_marker
    assert tool_format("auto", source).name == name


def test_a_chosen_parser_overrides_the_template() -> None:
    assert tool_format("llama3_json", "<tool_call>").name == "llama3_json"
    with pytest.raises(ValueError, match="unknown"):
        tool_format("nope", None)

