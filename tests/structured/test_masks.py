"""Token masks against references computed without llguidance.

For a finite language (a choice list, a bounded regex) the tokens that may come next are
known exactly: those whose bytes keep the text a prefix of some string of the language, and
the stop tokens once the text is in it. Random walks through the language compare the
bitmask the engine samples with (``MaskFiller`` -> ``apply_bitmask``) with that set, at every
step, in batches that also hold unconstrained rows.

One difference is by design: where the grammar forces the next bytes (after ``y``, a choice
of ``yes``/``no`` can only go on with ``es``), llguidance allows only the tokens of the
forced text's canonical tokenization, the way the model saw such text in training (``es``,
not ``e`` then ``s``). There the mask must be a non-empty subset of the reference, holding
the first token of the tokenizer's own encoding of the forced bytes.
"""

from __future__ import annotations

import random
import re

import pytest
import torch
from whole_output import accepts_whole

from rocmforge.errors import InvalidGrammarError
from rocmforge.structured import StructuredOutput
from rocmforge.structured.compiler import GrammarCompiler
from rocmforge.structured.matcher import GrammarMatcher, MaskFiller, apply_bitmask, apply_bitmask_reference
from rocmforge.tokenizer import Tokenizer


def _language(spec: StructuredOutput) -> list[bytes]:
    if spec.choice is not None:
        return [c.encode() for c in spec.choice]
    raise AssertionError(spec)


def _expected(tokenizer: Tokenizer, language: list[bytes], text: bytes) -> set[int]:
    allowed = {t for t in range(tokenizer.vocab_size) if not tokenizer.is_special(t)
               and any(s.startswith(text + tokenizer.token_bytes(t)) for s in language)}
    if text in language:
        allowed |= tokenizer.stop_ids
    return allowed


def _forced(language: list[bytes], text: bytes) -> bytes:
    """The bytes every continuation of ``text`` in the language starts with (empty when
    ``text`` may end here or two continuations differ in their first byte)."""
    rests = [s[len(text):] for s in language if s.startswith(text)]
    if b"" in rests:
        return b""
    forced = rests[0]
    for rest in rests[1:]:
        while not rest.startswith(forced):
            forced = forced[:-1]
    return forced


def _check_mask(tokenizer: Tokenizer, mask: set[int], expected: set[int], forced: bytes) -> None:
    if not forced:
        assert mask == expected
        return
    assert mask and mask <= expected
    canonical = tokenizer.encode(forced.decode("utf-8", errors="ignore"))
    if forced.decode("utf-8", errors="ignore").encode() == forced:  # whole characters only
        assert canonical[0] in mask, (forced, canonical, mask)


def _allowed_by_masks(filler: MaskFiller, rows: list[GrammarMatcher | None], vocab: int) -> list[set[int]]:
    pending = filler.start(rows)
    assert pending is not None
    logits = apply_bitmask(torch.zeros(len(rows), vocab), pending.result())
    return [set(torch.nonzero(torch.isfinite(row)).flatten().tolist()) for row in logits]


CHOICES = [
    StructuredOutput(choice=["yes", "no", "maybe"]),
    StructuredOutput(choice=["the", "there", "The times", " the times of"]),
    StructuredOutput(choice=["10", "100", "1010", "Once"]),
    StructuredOutput(choice=["é", "Zé", "naïve"]),  # multi-byte characters, split over tokens
]


@pytest.mark.parametrize("spec", CHOICES, ids=lambda s: s.source)
def test_choice_masks_match_the_language_along_random_walks(spec: StructuredOutput, compiler: GrammarCompiler,
                                                            tokenizer: Tokenizer) -> None:
    language = _language(spec)
    filler = MaskFiller()
    rng = random.Random(spec.source)
    for _walk in range(6):
        matcher = compiler.matcher(spec)
        text = b""
        while True:
            expected = _expected(tokenizer, language, text)
            free, constrained, _ = _allowed_by_masks(filler, [None, matcher, None], tokenizer.vocab_size)
            _check_mask(tokenizer, constrained, expected, _forced(language, text))
            assert free == set(range(tokenizer.vocab_size))
            assert {t for t in range(tokenizer.vocab_size) if matcher.allows(t)} == expected
            token = rng.choice(sorted(constrained))
            assert matcher.accept(token)
            if token in tokenizer.stop_ids:
                break
            text += tokenizer.token_bytes(token)
            if matcher.is_finished:  # nothing can follow: the engine ends the request here
                assert text in language and not any(s.startswith(text) and s != text for s in language)
                break
        assert text in language
        assert matcher.error is None


def test_regex_masks_match_along_random_walks(compiler: GrammarCompiler, tokenizer: Tokenizer) -> None:
    spec = StructuredOutput(regex=r"\d{1,4}")
    filler = MaskFiller()
    rng = random.Random(5)
    for _walk in range(8):
        matcher = compiler.matcher(spec)
        text = b""
        while True:
            expected = {t for t in range(tokenizer.vocab_size) if not tokenizer.is_special(t)
                        and re.fullmatch(rb"[0-9]*", tokenizer.token_bytes(t))
                        and 0 < len(tokenizer.token_bytes(t)) <= 4 - len(text)}
            if text:
                expected |= tokenizer.stop_ids
            [allowed] = _allowed_by_masks(filler, [matcher], tokenizer.vocab_size)
            assert allowed == expected, text
            token = rng.choice(sorted(expected))
            assert matcher.accept(token)
            if token in tokenizer.stop_ids or matcher.is_finished:
                break
            text += tokenizer.token_bytes(token)
        assert re.fullmatch(rb"[0-9]{1,4}", text)


def test_masks_of_a_batch_are_per_row(compiler: GrammarCompiler, tokenizer: Tokenizer) -> None:
    digits = compiler.matcher(StructuredOutput(regex="[0-9]+"))
    yes_no = StructuredOutput(choice=["yes", "no"])
    rows = _allowed_by_masks(MaskFiller(), [compiler.matcher(yes_no), None, digits, compiler.matcher(yes_no)],
                             tokenizer.vocab_size)
    assert rows[0] == rows[3] == {tokenizer.encode("y")[0], tokenizer.encode("n")[0]}
    assert rows[1] == set(range(tokenizer.vocab_size))
    assert rows[2] == {t for t in range(tokenizer.vocab_size) if re.fullmatch(rb"[0-9]+", tokenizer.token_bytes(t))}


def test_no_mask_without_constrained_rows() -> None:
    assert MaskFiller().start([None, None]) is None


@pytest.mark.parametrize("vocab", [1, 31, 32, 33, 320, 1000])
def test_apply_bitmask_matches_the_reference(vocab: int) -> None:
    gen = torch.Generator().manual_seed(vocab)
    words = -(-vocab // 32)
    logits = torch.randn(3, vocab, generator=gen)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, words), dtype=torch.int32, generator=gen)
    bitmask[1] = -1  # an unconstrained row
    bitmask[2, 0] = 0  # tokens 0..31 not allowed
    out = apply_bitmask(logits, bitmask)
    torch.testing.assert_close(out, apply_bitmask_reference(logits, bitmask), rtol=0, atol=0)
    assert torch.equal(out[1], logits[1])
    assert torch.isinf(out).any()


def test_copies_of_one_compiled_grammar_advance_independently(compiler: GrammarCompiler, tokenizer: Tokenizer) -> None:
    spec = StructuredOutput(choice=["yes", "no"])
    first, second = compiler.matcher(spec), compiler.matcher(spec)
    assert first.accept(tokenizer.encode("y")[0])
    assert second.allows(tokenizer.encode("n")[0]) and not first.allows(tokenizer.encode("n")[0])


def test_a_refused_token_breaks_the_matcher_with_a_reason(compiler: GrammarCompiler, tokenizer: Tokenizer) -> None:
    matcher = compiler.matcher(StructuredOutput(regex="[0-9]+"))
    assert not matcher.accept(tokenizer.encode("a")[0])
    assert matcher.error


@pytest.mark.parametrize("spec, words", [
    (StructuredOutput(json={"type": "integer", "minimum": 5, "maximum": 3}), "minimum (5) is greater than maximum (3)"),
    (StructuredOutput(json={"$ref": "#/$defs/missing"}), "/$defs/missing"),
    (StructuredOutput(json={"type": "strin"}), "strin"),
    (StructuredOutput(regex="(unclosed"), "regex"),
    (StructuredOutput(grammar="start: undefined_rule"), "undefined_rule"),
    (StructuredOutput(grammar="root ::= \"a\" missing"), "missing"),
    (StructuredOutput(grammar="this is no grammar"), "grammar"),
])
def test_constraints_that_do_not_compile_say_why(spec: StructuredOutput, words: str, compiler: GrammarCompiler) -> None:
    with pytest.raises(InvalidGrammarError) as info:
        compiler.matcher(spec)
    assert words in info.value.message
    assert info.value.param == spec.kind


@pytest.mark.parametrize("depth, words", [(300, "recursion limit exceeded"), (700, "nested too deeply"),
                                          (3000, "nested too deeply")])
def test_deep_schemas_are_refused(depth: int, words: str, compiler: GrammarCompiler) -> None:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    with pytest.raises(InvalidGrammarError, match=words):
        compiler.matcher(StructuredOutput(json=schema))


def test_huge_schemas_are_refused(compiler: GrammarCompiler) -> None:
    schema = {"type": "object", "properties": {f"p{i}": {"type": "string", "pattern": f"[a-z]{{{i}}}"}
                                               for i in range(20_000)}}
    with pytest.raises(InvalidGrammarError, match="schema too large"):
        compiler.matcher(StructuredOutput(json=schema))


def test_grammars_in_lark_and_gbnf_both_compile(compiler: GrammarCompiler, tokenizer: Tokenizer) -> None:
    for grammar in ('start: "ab" | "cd"', 'root ::= "ab" | "cd"'):
        matcher = compiler.matcher(StructuredOutput(grammar=grammar))
        allowed = {t for t in range(tokenizer.vocab_size) if matcher.allows(t)}
        assert allowed == {t for t in range(tokenizer.vocab_size) if tokenizer.token_bytes(t) in (b"a", b"c")}


def test_objects_are_closed_unless_the_schema_opens_them(compiler: GrammarCompiler, tokenizer: Tokenizer) -> None:
    point = {"type": "object", "properties": {"x": {"type": "integer"}}}
    nested = {"type": "array", "items": {"$ref": "#/$defs/point"}, "$defs": {"point": point}}
    extra = '{"x": 1, "y": 2}'
    assert accepts_whole(compiler, tokenizer, StructuredOutput(json=point), '{"x": 1}')
    assert not accepts_whole(compiler, tokenizer, StructuredOutput(json=point), extra)
    assert not accepts_whole(compiler, tokenizer, StructuredOutput(json=nested), f"[{extra}]")
    assert accepts_whole(compiler, tokenizer, StructuredOutput(json=nested), '[{"x": 1}]')
    opened = {**point, "additionalProperties": True}
    assert accepts_whole(compiler, tokenizer, StructuredOutput(json=opened), extra)
    # enum and const values are data, not schemas: left as written
    const = {"const": {"properties": {"a": 1}}}
    assert accepts_whole(compiler, tokenizer, StructuredOutput(json=const), '{"properties": {"a": 1}}')


def test_integers_without_bounds_are_json_safe_integers(compiler: GrammarCompiler, tokenizer: Tokenizer) -> None:
    def accepts(schema: dict, text: str) -> bool:
        return accepts_whole(compiler, tokenizer, StructuredOutput(json=schema), text)

    unbounded = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    assert accepts(unbounded, '{"n": 9007199254740991}') and accepts(unbounded, '{"n": -9007199254740991}')
    assert not accepts(unbounded, '{"n": 9007199254740992}')
    assert not accepts(unbounded, '{"n": -9007199254740992}')
    assert not accepts(unbounded, '{"n": 11111111111111111}')
    # a bound the schema gives is kept as written, on either side
    high = {"type": "integer", "minimum": 0}
    assert accepts(high, "0") and not accepts(high, "-1") and not accepts(high, "9007199254740992")
    wide = {"type": "integer", "minimum": -5, "maximum": 10**17}
    assert accepts(wide, "-5") and accepts(wide, "100000000000000000") and not accepts(wide, "-6")


def test_a_bad_constraint_is_refused_each_time_from_one_compile(compiler: GrammarCompiler) -> None:
    spec = StructuredOutput(json={"type": "integer", "minimum": 9, "maximum": 1})
    messages = []
    for _ in range(2):
        with pytest.raises(InvalidGrammarError) as info:
            compiler.matcher(spec)
        messages.append(info.value.message)
    assert messages[0] == messages[1] and "greater than maximum" in messages[0]
    assert compiler._compiled(spec) is compiler._compiled(spec)  # one cached error, not two compiles
