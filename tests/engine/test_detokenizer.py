"""Incremental detokenization with real tokenizers, and streaming through ``LLM.stream``.

Texts are tokenized, then fed back token by token: the deltas must concatenate to exactly
``tokenizer.decode(ids)``, never contain a broken character, never leak (any part of) a stop
string, and never be withdrawn (what was emitted stays a prefix of the final text).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from tiny_engine import assert_pool_idle

from rocmforge import SamplingParams
from rocmforge.engine.detokenizer import IncrementalDetokenizer
from rocmforge.gguf import read_gguf
from rocmforge.tokenizer import Tokenizer

TEXTS = [
    "Caf\u00e9 na\u00efve Z\u00fcrich, cr\u00e8me br\u00fbl\u00e9e, \u00c5ngstr\u00f6m",
    "\u6771\u4eac\u306f\u65e5\u672c\u306e\u9996\u90fd\u3067\u3059\u3002\u4f60\u597d\uff0c\u4e16\u754c\uff01",
    "\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440! \u0393\u03b5\u03b9\u03ac \u03c3\u03bf\u03c5",
    "Emoji: \U0001f600\U0001f680 \U0001f469\u200d\U0001f469\u200d\U0001f467 \U0001f1eb\U0001f1f7 \u2764\ufe0f end",
    "mixed \U0001f600a\u00e9b\u6771c\U0001f680 ascii \u00e9\u00e9\u00e9 \U0001f937\U0001f3fd\u200d\u2642\ufe0f",
]


@pytest.fixture(scope="module")
def smollm2_tokenizer(default_gguf) -> Tokenizer:
    with read_gguf(default_gguf) as gguf:
        return Tokenizer.from_gguf_metadata(gguf.metadata)


@pytest.fixture(params=["tiny", "smollm2"])
def tokenizer(request: pytest.FixtureRequest) -> Tokenizer:
    return request.getfixturevalue(f"{request.param}_tokenizer")


@dataclass
class Streamed:
    deltas: list[str] = field(default_factory=list)
    """One per token fed, then the ``finish()`` flush."""
    stop: str | None = None
    stop_at: int | None = None
    """How many tokens had been fed when the stop string matched."""
    text: str = ""
    """The detokenizer's final ``.text``."""

    @property
    def emitted(self) -> str:
        return "".join(self.deltas)


def stream(tokenizer: Tokenizer, ids: list[int], params: SamplingParams) -> Streamed:
    """Feed ``ids`` one at a time (stopping at a stop string, as the engine does), then flush."""
    detok = IncrementalDetokenizer(tokenizer, params)
    out = Streamed()
    for n, token in enumerate(ids, start=1):
        update = detok.add(token)
        out.deltas.append(update.delta)
        if update.stop is not None:
            out.stop, out.stop_at = update.stop, n
            break
    out.deltas.append(detok.finish())
    out.text = detok.text
    return out


def complete_prefix(tokenizer: Tokenizer, ids: list[int]) -> str:
    """The text of the complete characters of ``ids``' bytes (valid UTF-8 text assumed)."""
    data = b"".join(tokenizer.token_bytes(t) for t in ids if not tokenizer.is_special(t))
    return data.decode("utf-8", errors="ignore")


# --- plain streaming --------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_decode_and_never_break_a_character(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    out = stream(tokenizer, ids, SamplingParams())
    assert out.emitted == out.text == tokenizer.decode(ids)
    assert not any("\ufffd" in d for d in out.deltas)
    # No hold-back without stop strings: each character is emitted as soon as it is complete.
    for n in range(1, len(ids) + 1):
        assert "".join(out.deltas[:n]) == complete_prefix(tokenizer, ids[:n])


def test_the_texts_do_split_characters_across_tokens(tokenizer: Tokenizer) -> None:
    """The tests above are meaningful: some tokens hold only part of a UTF-8 character."""
    split = 0
    for text in TEXTS:
        for token in tokenizer.encode(text):
            try:
                tokenizer.token_bytes(token).decode("utf-8")
            except UnicodeDecodeError:
                split += 1
    assert split >= 5


@pytest.mark.parametrize("skip", [True, False])
def test_skip_special_tokens(tokenizer: Tokenizer, skip: bool) -> None:
    text = "<|im_start|>user\nCaf\u00e9 \U0001f600 \u6771\u4eac<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer.encode(text)
    specials = [t for t in ids if tokenizer.is_special(t)]
    assert len(specials) == 3
    out = stream(tokenizer, ids, SamplingParams(skip_special_tokens=skip))
    assert out.emitted == out.text == tokenizer.decode(ids, skip_special=skip)
    assert ("<|im_start|>" in out.emitted) is not skip
    if skip:
        assert out.emitted == "user\nCaf\u00e9 \U0001f600 \u6771\u4eac\nassistant\n"
    else:
        assert out.emitted == text


# --- stop strings -------------------------------------------------------------------------------


def _assert_never_withdrawn(out: Streamed, final: str) -> None:
    emitted = ""
    for delta in out.deltas:
        emitted += delta
        assert final.startswith(emitted), (emitted, final)
    assert emitted == final


def _tokens_touching(tokenizer: Tokenizer, ids: list[int], start: int, end: int) -> int:
    """How many tokens contribute characters to ``text[start:end]``."""
    count, before = 0, 0
    for n in range(1, len(ids) + 1):
        now = len(complete_prefix(tokenizer, ids[:n]))
        if now > before and before < end and now > start:
            count += 1
        before = now
    return count


STOP_TEXT = "Hello \u6771\u4eac world \U0001f600\U0001f680 and caf\u00e9s, then more text after it."


@pytest.mark.parametrize(
    "stop",
    [
        "\u4eac wor",  # CJK + ASCII across tokens
        "\U0001f600\U0001f680 an",  # two emoji, each split over byte tokens
        "\u00e9s, th",
        "ld",  # inside one token, possibly
        "Hello",  # at the very start: nothing at all is emitted
    ],
)
def test_stop_string_is_never_leaked(tokenizer: Tokenizer, stop: str) -> None:
    ids = tokenizer.encode(STOP_TEXT)
    index = STOP_TEXT.index(stop)
    out = stream(tokenizer, ids, SamplingParams(stop=[stop, "never in the text"]))
    assert out.stop == stop
    assert out.text == STOP_TEXT[:index]
    _assert_never_withdrawn(out, STOP_TEXT[:index])
    # It matched at the token that completed it, not later.
    assert stop in complete_prefix(tokenizer, ids[: out.stop_at])
    assert stop not in complete_prefix(tokenizer, ids[: out.stop_at - 1])


def test_stop_strings_do_span_token_boundaries(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(STOP_TEXT)
    for stop in ("\u4eac wor", "\U0001f600\U0001f680 an"):
        start = STOP_TEXT.index(stop)
        assert _tokens_touching(tokenizer, ids, start, start + len(stop)) >= 2


def test_the_earliest_stop_string_wins(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(STOP_TEXT)
    out = stream(tokenizer, ids, SamplingParams(stop=["more", "\U0001f680", "caf"]))
    assert (out.stop, out.text) == ("\U0001f680", STOP_TEXT[: STOP_TEXT.index("\U0001f680")])
    # Both end with the same byte, so both match in the same step: the one that starts
    # first ends the text, whatever the order of the list.
    for stops in (["\U0001f600", "d \U0001f600"], ["d \U0001f600", "\U0001f600"]):
        out = stream(tokenizer, ids, SamplingParams(stop=stops))
        assert (out.stop, out.text) == ("d \U0001f600", STOP_TEXT[: STOP_TEXT.index("d \U0001f600")])


def test_partial_matches_are_held_back_then_emitted(tokenizer: Tokenizer) -> None:
    text = "abc ab abd abx \u6771\u4eac\u6771 \u6771\u4eac\u90fd! the en end"
    stops = ["abz", "\u6771\u4eac\u5e9c", "endless"]
    hold = max(len(s) for s in stops) - 1
    ids = tokenizer.encode(text)
    out = stream(tokenizer, ids, SamplingParams(stop=stops))
    assert out.stop is None
    _assert_never_withdrawn(out, text)
    assert out.text == text
    # While streaming, at most len(longest stop) - 1 characters are held back.
    for n in range(1, len(ids) + 1):
        emitted = "".join(out.deltas[:n])
        assert len(emitted) >= len(complete_prefix(tokenizer, ids[:n])) - hold
    assert len("".join(out.deltas[:-1])) < len(text)  # the flush had something to give


def test_stop_string_written_as_special_token(tokenizer: Tokenizer) -> None:
    text = "Caf\u00e9 \U0001f600<|im_end|> after"
    ids = tokenizer.encode(text)
    out = stream(tokenizer, ids, SamplingParams(stop=["<|im_end|>"], skip_special_tokens=False))
    assert (out.stop, out.text) == ("<|im_end|>", "Caf\u00e9 \U0001f600")
    _assert_never_withdrawn(out, out.text)
    hidden = stream(tokenizer, ids, SamplingParams(stop=["<|im_end|>"]))  # skipped: no text
    assert (hidden.stop, hidden.text) == (None, "Caf\u00e9 \U0001f600 after")


def _completion_counts(tokenizer: Tokenizer, ids: list[int], text: str, stop: str) -> list[int]:
    """For each occurrence of ``stop``: how many tokens complete it."""
    counts, start = [], 0
    while (i := text.find(stop, start)) >= 0:
        end = i + len(stop)
        done = (n for n in range(1, len(ids) + 1) if len(complete_prefix(tokenizer, ids[:n])) >= end)
        counts.append(next(done))
        start = i + 1
    return counts


def test_min_tokens_ignores_stop_strings_until_reached(tokenizer: Tokenizer) -> None:
    text = "one \u00e9STOP\u00e9 two \U0001f600STOP three STOP four \u6771\u4eac"
    ids = tokenizer.encode(text)
    first, second, third = _completion_counts(tokenizer, ids, text, "STOP")
    assert first < second - 1 < third - 2
    occurrences = [i for i in range(len(text)) if text.startswith("STOP", i)]

    def run(min_tokens: int) -> Streamed:
        return stream(tokenizer, ids, SamplingParams(stop=["STOP"], min_tokens=min_tokens, max_tokens=64))

    # Ignored while fewer than min_tokens tokens were generated: the text keeps "STOP".
    out = run(first + 1)
    assert (out.stop, out.stop_at, out.text) == ("STOP", second, text[: occurrences[1]])
    _assert_never_withdrawn(out, out.text)
    out = run(second + 1)
    assert (out.stop_at, out.text) == (third, text[: occurrences[2]])
    out = run(len(ids))
    assert (out.stop, out.text) == (None, text)
    _assert_never_withdrawn(out, text)
    # Reached: a stop string completed by the min_tokens-th token ends generation, as a stop
    # token at that position does (the scheduler finishes once num_output >= min_tokens).
    out = run(first)
    assert (out.stop_at, out.text) == (first, text[: occurrences[0]])
    out = run(0)
    assert (out.stop_at, out.text) == (first, text[: occurrences[0]])


# --- streaming through the LLM ------------------------------------------------------------------

STREAM_PROMPTS = [
    "\U0001f600 Caf\u00e9 \u6771\u4eac",
    "\u041f\u0440\u0438\u0432\u0435\u0442 \U0001f680\U0001f469\u200d\U0001f469\u200d\U0001f467",
    "\u6771\u4eac\u306f\u65e5\u672c\u306e\u9996\u90fd",
]


@pytest.mark.parametrize("prompt", STREAM_PROMPTS)
def test_stream_deltas_equal_generate_text(make_llm, prompt: str) -> None:
    llm = make_llm(block_size=4)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    [expected] = llm.generate(prompt, params)
    outputs = list(llm.stream(prompt, params))
    assert sum(len(o.new_token_ids) for o in outputs) == len(expected.token_ids)
    assert [t for o in outputs for t in o.new_token_ids] == expected.token_ids
    assert "".join(o.delta_text for o in outputs) == outputs[-1].text == expected.text
    assert outputs[-1].finished and not any(o.finished for o in outputs[:-1])
    assert outputs[-1].finish_reason == "length"
    for n, o in enumerate(outputs, start=1):  # .text is always everything so far
        assert o.text == "".join(x.delta_text for x in outputs[:n])
    assert_pool_idle(llm)


def test_stream_with_stop_string_equals_generate(make_llm) -> None:
    llm = make_llm(block_size=4)
    prompt = STREAM_PROMPTS[0]
    [full] = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
    stop = next(
        full.text[i : i + 2]
        for i in range(4, len(full.text) - 2)
        if "\ufffd" not in full.text[i : i + 2] and full.text[i : i + 2].strip()
    )
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=[stop])
    [expected] = llm.generate(prompt, params)
    assert (expected.finish_reason, expected.stop_reason) == ("stop", stop)
    assert expected.text == full.text[: full.text.index(stop)]
    outputs = list(llm.stream(prompt, params))
    assert "".join(o.delta_text for o in outputs) == outputs[-1].text == expected.text
    assert (outputs[-1].finish_reason, outputs[-1].stop_reason) == ("stop", stop)
    assert_pool_idle(llm)
