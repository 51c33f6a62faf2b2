"""Real models' chat templates render exactly as HF transformers renders them."""

from __future__ import annotations

from typing import Any

import pytest
from real_templates import ALTERNATING, CONVERSATION, LLAMA3, MISTRAL, QWEN3, QWEN25, TOOLS

from rocmforge.errors import ChatTemplateError
from rocmforge.tokenizer import ChatTemplate, Tokenizer

BOS, EOS = "<s>", "</s>"

CASES = [
    ("llama3", LLAMA3, [CONVERSATION[0], *ALTERNATING], {}),
    ("mistral", MISTRAL, ALTERNATING, {}),
    ("qwen2.5 tools", QWEN25, CONVERSATION, {"tools": TOOLS}),
    ("qwen2.5 plain", QWEN25, ALTERNATING, {}),
    ("qwen3 tools", QWEN3, CONVERSATION, {"tools": TOOLS}),
    ("qwen3 no thinking", QWEN3, CONVERSATION, {"enable_thinking": False}),
]


def _hf_render(source: str, messages: list[dict[str, Any]], **extra: Any) -> str:
    chat_template_utils = pytest.importorskip("transformers.utils.chat_template_utils")
    compile_template = getattr(chat_template_utils, "_compile_jinja_template", None)
    if compile_template is None:
        pytest.skip("this transformers has no _compile_jinja_template")
    rendered: str = compile_template(source).render(
        messages=messages, add_generation_prompt=True, bos_token=BOS, eos_token=EOS, **extra
    )
    return rendered


@pytest.mark.parametrize(("name", "source", "messages", "extra"), CASES, ids=[c[0] for c in CASES])
def test_renders_like_transformers(
    name: str, source: str, messages: list[dict[str, Any]], extra: dict[str, Any]
) -> None:
    ours = ChatTemplate(source, bos_token=BOS, eos_token=EOS).render(messages, **extra)
    assert ours == _hf_render(source, messages, **extra)


def test_known_outputs() -> None:
    """Spot checks that do not depend on transformers being installed."""
    llama = ChatTemplate(LLAMA3, bos_token="<|begin_of_text|>").render(ALTERNATING[:1])
    assert llama == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    mistral = ChatTemplate(MISTRAL, bos_token=BOS, eos_token=EOS).render(ALTERNATING)
    assert mistral == (
        "<s>[INST] Hi [/INST]Hello! How can I help?</s>[INST] Write a haiku about GPUs. [/INST]"
    )
    qwen = ChatTemplate(QWEN3).render(CONVERSATION, enable_thinking=False)
    assert qwen.startswith("<|im_start|>system\nYou are terse.<|im_end|>\n")
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert call in qwen
    assert qwen.endswith(
        "<|im_start|>user\n  And tomorrow?  <|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )


def test_mistral_rejects_roles_that_do_not_alternate() -> None:
    template = ChatTemplate(MISTRAL)
    with pytest.raises(ChatTemplateError, match="Conversation roles must alternate"):
        template.render([*ALTERNATING[:1], *ALTERNATING[:1]])


@pytest.mark.slow
def test_default_models_template(smollm: Tokenizer) -> None:
    assert smollm.chat_template is not None
    source = smollm.chat_template.source
    rendered = smollm.chat_template.render(ALTERNATING)
    assert rendered == _hf_render(source, ALTERNATING)
    assert rendered.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
