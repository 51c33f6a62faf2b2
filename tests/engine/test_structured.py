"""Structured outputs through the whole engine, on the tiny random-weight llama.

Random weights make a hard client: left alone the model writes anything, so every output
below conforms only because the mask held at every step. The greedy test also checks each
choice against an HF transformers forward of the same weights: the engine's token is the
reference's most likely token among those the constraint allows, computed here from the
language itself.
"""

from __future__ import annotations

import json
import re

import pytest
from tiny_engine import TinyModel, assert_pool_idle, hf_log_softmax

from rocmforge.errors import InvalidGrammarError
from rocmforge.sampling_params import SamplingParams
from rocmforge.structured import StructuredOutput
from rocmforge.tokenizer import Tokenizer

PROMPT = [5, 77, 120, 33, 9, 250, 18]
TOL = 2e-4

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
    },
    "required": ["name", "age", "ok", "tags"],
    "additionalProperties": False,
}


def _is_person(value: object) -> bool:
    return (isinstance(value, dict) and list(value) == ["name", "age", "ok", "tags"]
            and isinstance(value["name"], str) and len(value["name"]) <= 8
            and type(value["age"]) is int and 0 <= value["age"] <= 120
            and isinstance(value["ok"], bool)
            and isinstance(value["tags"], list) and len(value["tags"]) <= 3
            and all(tag in ("red", "green", "blue") for tag in value["tags"]))


def test_greedy_regex_picks_the_references_best_allowed_token(make_llm, tiny_model: TinyModel,
                                                              tiny_tokenizer: Tokenizer) -> None:
    llm = make_llm()
    params = SamplingParams(max_tokens=8, temperature=0, logprobs=1,
                            structured=StructuredOutput(regex="[0-9]{1,4}"))
    [out] = llm.generate([PROMPT], params)
    assert out.finish_reason == "stop"
    if out.token_ids[-1] in tiny_tokenizer.stop_ids:  # the model chose to end
        assert out.stop_reason == out.token_ids[-1]
    else:  # four digits: the grammar ended it
        assert len(out.text) == 4 and out.stop_reason is None
    reference = hf_log_softmax(tiny_model, PROMPT + out.token_ids)
    text = b""
    for i, token in enumerate(out.token_ids):
        allowed = [t for t in range(tiny_tokenizer.vocab_size) if not tiny_tokenizer.is_special(t)
                   and re.fullmatch(rb"[0-9]+", tiny_tokenizer.token_bytes(t))
                   and len(text + tiny_tokenizer.token_bytes(t)) <= 4]
        if text:
            allowed += sorted(tiny_tokenizer.stop_ids)
        row = reference[len(PROMPT) - 1 + i]
        assert token == max(allowed, key=lambda t: row[t].item()), i
        # logprobs are the model's, before the mask
        assert abs(out.logprobs[i].logprob - row[token].item()) <= TOL
        if token in tiny_tokenizer.stop_ids:
            break
        text += tiny_tokenizer.token_bytes(token)
    assert re.fullmatch(r"[0-9]{1,4}", out.text)
    # unconstrained, the model does not write digits: the mask did the work
    [free] = llm.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0))
    assert not re.fullmatch(r"[0-9]{1,4}", free.text)
    assert_pool_idle(llm)


@pytest.mark.parametrize("seed", range(6))
def test_sampled_json_conforms_to_the_schema(make_llm, seed: int) -> None:
    llm = make_llm()
    params = SamplingParams(max_tokens=120, temperature=1.0, seed=seed, structured=StructuredOutput(json=PERSON))
    [out] = llm.generate([PROMPT], params)
    assert out.finish_reason == "stop", out.text
    assert out.stop_reason is None
    assert _is_person(json.loads(out.text)), out.text
    assert_pool_idle(llm)


def test_constrained_and_free_requests_share_a_batch(make_llm) -> None:
    llm = make_llm()
    free = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    alone = [c.token_ids for c in llm.generate([PROMPT, PROMPT[::-1]], free)]
    choice = SamplingParams(max_tokens=12, temperature=0, structured=StructuredOutput(choice=["red", "green", "blue"]))
    json_obj = SamplingParams(max_tokens=60, temperature=0.8, seed=1, structured=StructuredOutput(json_object=True))
    outs = llm.generate([PROMPT, PROMPT, PROMPT[::-1], PROMPT[1:]], [free, choice, free, json_obj])
    assert [outs[0].token_ids, outs[2].token_ids] == alone
    assert outs[1].text in ("red", "green", "blue") and outs[1].finish_reason == "stop"
    if outs[3].finish_reason == "stop":
        assert isinstance(json.loads(outs[3].text), dict)
    else:  # a random model may write a long object; what it wrote is a prefix of one
        assert outs[3].finish_reason == "length" and outs[3].text.startswith("{")
    assert_pool_idle(llm)


def test_a_grammar_ending_the_output_ends_the_request_even_before_min_tokens(make_llm) -> None:
    llm = make_llm()
    [out] = llm.generate([PROMPT], SamplingParams(max_tokens=50, min_tokens=20, temperature=0,
                                                  structured=StructuredOutput(grammar='start: "ab" | "cd"')))
    assert out.text in ("ab", "cd") and out.finish_reason == "stop"
    assert_pool_idle(llm)


def test_a_broken_matcher_fails_its_request_alone(make_llm, tiny_tokenizer: Tokenizer) -> None:
    llm = make_llm()
    engine = llm.engine
    spec = StructuredOutput(regex="[a-z]+")
    engine.add_request("broken", PROMPT, SamplingParams(max_tokens=10, temperature=0, structured=spec))
    engine.add_request("fine", PROMPT, SamplingParams(max_tokens=10, temperature=0, structured=spec))
    engine.add_request("free", PROMPT, SamplingParams(max_tokens=10, temperature=0))
    # the grammar state breaks mid-flight (as a grammar over its limits would)
    assert not engine.scheduler.get_request("broken").grammar.accept(tiny_tokenizer.encode("7")[0])
    finals = {}
    while engine.has_unfinished():
        for output in engine.step():
            if output.finished:
                finals[output.request_id] = output
    assert finals["broken"].finish_reason == "error"
    assert "structured output" in finals["broken"].error
    assert re.fullmatch("[a-z]+", finals["fine"].text) and finals["fine"].error is None
    assert finals["free"].finish_reason in ("length", "stop") and finals["free"].error is None
    assert_pool_idle(llm)


def test_a_constraint_that_does_not_compile_is_refused_at_admission(make_llm) -> None:
    llm = make_llm()
    bad = SamplingParams(structured=StructuredOutput(json={"type": "integer", "minimum": 3, "maximum": 1}))
    with pytest.raises(InvalidGrammarError, match="greater than maximum"):
        llm.generate([PROMPT], bad)
    [out] = llm.generate([PROMPT], SamplingParams(max_tokens=4, temperature=0))
    assert out.token_ids
    assert_pool_idle(llm)
