"""The default model's tokenizer against the shared reference data and HF transformers."""

from __future__ import annotations

from typing import Any

import pytest

from rocmforge.tokenizer import Tokenizer

pytestmark = pytest.mark.slow  # needs the default model

REFERENCES = ["reference_hf", "reference_llamacpp"]

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": 'And 3 × 3?\nAnswer in words, "quoted" <b>please</b>.'},
]


@pytest.mark.parametrize("reference", REFERENCES)
def test_tokenize_matches_reference(
    smollm: Tokenizer, reference: str, request: pytest.FixtureRequest
) -> None:
    cases = request.getfixturevalue(reference)["tokenize"]
    assert cases
    for case in cases:
        assert smollm.encode(case["text"]) == case["ids"], case["text"]


@pytest.mark.parametrize("reference", REFERENCES)
def test_greedy_prompt_ids_match_reference(
    smollm: Tokenizer, reference: str, request: pytest.FixtureRequest
) -> None:
    cases = request.getfixturevalue(reference)["greedy"]
    assert cases
    for case in cases:
        assert smollm.encode(case["prompt"]) == case["prompt_ids"], case["prompt"]


def test_decode_round_trips_reference_texts(smollm: Tokenizer, reference_hf: dict) -> None:
    texts = [c["text"] for c in reference_hf["tokenize"]] + [
        c["prompt"] for c in reference_hf["greedy"]
    ]
    for text in texts:
        ids = smollm.encode(text)
        assert smollm.decode(ids) == text
        assert b"".join(smollm.token_bytes(i) for i in ids).decode("utf-8") == text


def test_greedy_continuation_text_decodes_like_reference(
    smollm: Tokenizer, reference_hf: dict
) -> None:
    for case in reference_hf["greedy"]:
        assert smollm.decode(case["greedy_ids"]) == case["greedy_text"]


def test_special_ids_and_flags(smollm: Tokenizer) -> None:
    assert smollm.vocab_size == 49152
    assert (smollm.bos_id, smollm.eos_id) == (1, 2)
    assert smollm.add_bos is False and smollm.add_eos is False
    # <|im_end|> is the EOS; <|endoftext|> is a control token that also ends generation
    assert smollm.stop_ids == frozenset({0, 2})
    assert smollm.encode("hi", add_special=True) == smollm.encode("hi")
    assert smollm.is_special(1) and not smollm.is_special(19556)
    assert smollm.decode([1, 4093, 198, 2], skip_special=True) == "user\n"


def test_token_bytes_agree_with_decode_for_every_token(smollm: Tokenizer) -> None:
    checked = 0
    for token_id in range(smollm.vocab_size):
        raw = smollm.token_bytes(token_id)
        if smollm.is_special(token_id):
            assert raw == smollm.id_to_token(token_id).encode("utf-8")
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue  # part of a multi-byte character: only meaningful joined with others
        assert smollm.decode([token_id]) == text, token_id
        checked += 1
    assert checked > 45_000


def test_chat_template_renders_like_transformers(smollm: Tokenizer, hf_smollm: Any) -> None:
    assert smollm.chat_template is not None
    for messages in (CONVERSATION, CONVERSATION[1:2]):  # the second gets the default system prompt
        for add_generation_prompt in (True, False):
            ours = smollm.chat_template.render(
                messages, add_generation_prompt=add_generation_prompt
            )
            theirs = hf_smollm.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
            assert ours == theirs


def test_chat_template_known_rendering(smollm: Tokenizer) -> None:
    """The expected text written out from the template source, independent of transformers."""
    assert smollm.chat_template is not None
    rendered = smollm.chat_template.render([{"role": "user", "content": "Hi"}])
    assert rendered == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = smollm.encode(rendered)
    assert ids[0] == 1 and ids[-3:] == [520, 9531, 198]  # <|im_start|> ... "assistant\n"
