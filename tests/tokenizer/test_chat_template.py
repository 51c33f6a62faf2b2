"""ChatTemplate: HF-compatible rendering, sandboxing, and typed errors."""

from __future__ import annotations

import datetime
from typing import Any

import jinja2
import pytest
from jinja2.sandbox import SecurityError

from rocmforge.errors import ChatTemplateError, TokenizerError
from rocmforge.tokenizer import ChatTemplate

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
USER = [{"role": "user", "content": "Hi"}]


def test_chatml() -> None:
    template = ChatTemplate(CHATML)
    assert template.render(USER) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert template.render(USER, add_generation_prompt=False) == "<|im_start|>user\nHi<|im_end|>\n"


def test_bos_eos_defaults_and_overrides() -> None:
    template = ChatTemplate(
        "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}", bos_token="<s>", eos_token="</s>"
    )
    assert template.render(USER) == "<s>Hi</s>"
    assert template.render(USER, bos_token="", eos_token="!") == "Hi!"


def test_extra_variables_reach_the_template() -> None:
    template = ChatTemplate("{% if tools %}{{ tools | length }} tools{% endif %}")
    assert template.render(USER, tools=[{"name": "a"}, {"name": "b"}]) == "2 tools"
    assert template.render(USER) == ""


def test_trim_and_lstrip_blocks() -> None:
    source = (
        "{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m.content }}]\n"
        "    {% endif %}\n{% endfor %}"
    )
    assert ChatTemplate(source).render(USER + USER) == "[Hi]\n[Hi]\n"


def test_tojson_like_hf() -> None:
    template = ChatTemplate(
        "{{ messages[0] | tojson }}|{{ {'b': 1, 'a': '<é>'} | tojson(indent=2, sort_keys=True) }}"
    )
    rendered = template.render([{"role": "user", "content": "<b>&'\"</b>"}])
    assert rendered == '{"role": "user", "content": "<b>&\'\\"</b>"}|{\n  "a": "<é>",\n  "b": 1\n}'


def test_strftime_now() -> None:
    year = datetime.datetime.now().strftime("%Y")
    assert ChatTemplate("{{ strftime_now('%Y') }}").render(USER) in {year, str(int(year) + 1)}


def test_loop_controls_and_generation_tag() -> None:
    source = (
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
        "{% generation %}<{{ m.content }}>{% endgeneration %}{% endfor %}"
    )
    assert ChatTemplate(source).render([*USER, {"role": "user", "content": "x"}]) == "<Hi>"


def test_syntax_error() -> None:
    with pytest.raises(ChatTemplateError, match="syntax error at line 2") as info:
        ChatTemplate("ok\n{% for m in messages %}{{ m }")
    assert isinstance(info.value.__cause__, jinja2.TemplateSyntaxError)


def test_raise_exception_keeps_the_templates_message() -> None:
    template = ChatTemplate(
        "{% if messages[0].role != 'system' %}"
        "{{ raise_exception('Conversation must start with a system message') }}{% endif %}"
    )
    with pytest.raises(
        ChatTemplateError, match="Conversation must start with a system message"
    ) as info:
        template.render(USER)
    assert isinstance(info.value.__cause__, jinja2.TemplateError)


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__ }}",  # Jinja alone renders this as empty; we refuse
        "{{ messages.__class__.__base__.__subclasses__() }}",
        "{{ raise_exception.__globals__ }}",
        "{% set _ = messages.append({'role': 'x', 'content': 'y'}) %}",
        "{% set _ = messages[0].update({'content': 'y'}) %}",
    ],
)
def test_sandbox_escapes_are_refused(source: str) -> None:
    with pytest.raises(ChatTemplateError, match="sandbox") as info:
        ChatTemplate(source).render(USER)
    assert isinstance(info.value.__cause__, SecurityError)


@pytest.mark.parametrize(
    "source",
    [
        "{{ messages[5].content }}",
        "{{ messages[0].content + 1 }}",
        "{{ 1 / 0 }}",
        "{{ undefined_thing.attr }}",
        "{{ range(1, 2, 0) }}",
    ],
)
def test_runtime_errors(source: str) -> None:
    with pytest.raises(ChatTemplateError, match="chat template failed") as info:
        ChatTemplate(source).render(USER)
    assert info.value.__cause__ is not None


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ("hello", "must be a list"),
        ([], "must not be empty"),
        (["hello"], r"messages\[0\] must be an object"),
        ([{"content": "x"}], r"messages\[0\].role must be a string"),
        (
            [{"role": "user", "content": "a"}, {"role": "user", "content": 3}],
            r"messages\[1\].content must be a string",
        ),
        ([{"role": "user"}], r"messages\[0\].content must be a string, got NoneType"),
        (
            [{"role": "user", "content": [{"type": "text", "text": "x"}]}],
            "content must be a string",
        ),
    ],
)
def test_invalid_messages(messages: Any, message: str) -> None:
    with pytest.raises(ChatTemplateError, match=message) as info:
        ChatTemplate(CHATML).render(messages)
    assert isinstance(info.value, TokenizerError) and info.value.param == "messages"


def test_tool_call_message_may_have_no_content() -> None:
    template = ChatTemplate(
        "{% for m in messages %}{{ m.role }}:{{ m.content or m.tool_calls | tojson }};{% endfor %}"
    )
    messages = [USER[0], {"role": "assistant", "content": None, "tool_calls": [{"name": "f"}]}]
    assert template.render(messages) == 'user:Hi;assistant:[{"name": "f"}];'
