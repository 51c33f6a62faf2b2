"""encode(parse_special=False): control-token text is plain text, as llama.cpp's --no-special.

Control and unknown tokens are not matched; user-defined tokens still are.  The same holds
for vocabularies built from GGUF metadata (both model types) and from an HF tokenizer.json.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from synthetic_vocabs import byte_level_metadata, spm_metadata, texts_of
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from rocmforge.errors import TokenizerError
from rocmforge.tokenizer import Tokenizer


def test_byte_level() -> None:
    tokenizer = Tokenizer.from_gguf_metadata(
        byte_level_metadata(["Ġ t", "h e"], user_defined=["<tool_call>"])
    )
    text = "<|im_start|>he<tool_call>"
    assert texts_of(tokenizer, tokenizer.encode(text)) == ["<|im_start|>", "he", "<tool_call>"]
    plain = tokenizer.encode(text, parse_special=False)
    assert texts_of(tokenizer, plain) == [*"<|im_start|>", "he", "<tool_call>"]
    assert tokenizer.decode(plain) == text
    assert tokenizer.encode("he there", parse_special=False) == tokenizer.encode("he there")


def test_sentencepiece_control_and_unknown_tokens() -> None:
    tokenizer = Tokenizer.from_gguf_metadata(spm_metadata())
    assert texts_of(tokenizer, tokenizer.encode("<s>hello<unk>")) == ["<s>", "▁hello", "<unk>"]
    plain = tokenizer.encode("<s>hello<unk>", parse_special=False)
    assert not any(tokenizer.is_special(i) for i in plain)
    assert tokenizer.decode(plain) == "<s>hello<unk>"


def test_add_special_still_adds_bos() -> None:
    tokenizer = Tokenizer.from_gguf_metadata(spm_metadata())
    ids = tokenizer.encode("<s>", add_special=True, parse_special=False)
    assert ids[0] == tokenizer.bos_id and tokenizer.bos_id not in ids[1:]


def test_tokenizer_json(tmp_path: Path) -> None:
    vocab = {chr(c): c - 32 for c in range(32, 127)}
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken("<|end|>", special=True, normalized=False)])
    backend.add_tokens([AddedToken("<think>", special=False, normalized=False)])
    path = tmp_path / "tokenizer.json"
    backend.save(str(path))
    tokenizer = Tokenizer.from_file(path)
    end, think = tokenizer.token_to_id("<|end|>"), tokenizer.token_to_id("<think>")
    assert tokenizer.encode("<think>a<|end|>") == [think, vocab["a"], end]
    plain = tokenizer.encode("<think>a<|end|>", parse_special=False)
    assert plain[0] == think and end not in plain
    assert tokenizer.decode(plain) == "<think>a<|end|>"


@pytest.mark.slow
def test_default_model(smollm: Tokenizer) -> None:
    text = "<|im_start|>user\nHi<|im_end|>"
    plain = smollm.encode(text, parse_special=False)
    assert not any(smollm.is_special(i) for i in plain)
    assert smollm.decode(plain) == text
    assert smollm.encode("Hi there", parse_special=False) == smollm.encode("Hi there")


@pytest.mark.parametrize("parse_special", [True, False])
@pytest.mark.parametrize(
    ("text", "index", "code_point"), [("hi \ud800", 3, "D800"), ("\udfffx", 0, "DFFF")]
)
def test_lone_surrogates_are_a_typed_error(
    parse_special: bool, text: str, index: int, code_point: str
) -> None:
    tokenizer = Tokenizer.from_gguf_metadata(byte_level_metadata(["Ġ t"]))
    with pytest.raises(TokenizerError) as info:
        tokenizer.encode(text, parse_special=parse_special)
    assert str(info.value) == (
        f"text to encode is not valid Unicode: lone surrogate U+{code_point} at character {index}"
    )
    assert info.value.code == "tokenizer_error" and info.value.http_status == 400


def test_max_token_bytes() -> None:
    tokenizer = Tokenizer.from_gguf_metadata(byte_level_metadata(["Ġ t", "h e"]))
    assert tokenizer.max_token_bytes == len("<|endoftext|>")
    longest = max(len(tokenizer.token_bytes(i)) for i in range(tokenizer.vocab_size))
    assert tokenizer.max_token_bytes == longest
