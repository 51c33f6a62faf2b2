"""Tokenizer.from_file: an HF tokenizer.json override, with config or GGUF metadata beside it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from rocmforge.errors import TokenizerError
from rocmforge.tokenizer import Tokenizer
from rocmforge.tokenizer.vocab import TokenStyle

TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{{ eos_token }}{% endfor %}"


@pytest.fixture(scope="module")
def smollm_json(hf_smollm: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """transformers' conversion of the default model, with SmolLM's upstream pre-tokenizer,
    saved as tokenizer.json -- what the model's own repository ships."""
    backend = HFTokenizer.from_str(hf_smollm.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    path = tmp_path_factory.mktemp("smollm_json") / "tokenizer.json"
    backend.save(str(path))
    return path


@pytest.mark.slow
def test_file_with_config_beside_it(
    smollm_json: Path, smollm: Tokenizer, reference_hf: dict
) -> None:
    config = {
        "bos_token": "<|im_start|>",
        "eos_token": {"content": "<|im_end|>", "special": True},
        "add_bos_token": False,
        "chat_template": TEMPLATE,
    }
    (smollm_json.parent / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = Tokenizer.from_file(smollm_json)
    assert tokenizer.style is TokenStyle.BYTE_LEVEL
    assert (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id) == (49152, 1, 2)
    assert tokenizer.stop_ids == frozenset({0, 2}) and not tokenizer.add_bos
    for case in reference_hf["tokenize"]:
        assert tokenizer.encode(case["text"]) == case["ids"]
    assert all(tokenizer.token_bytes(i) == smollm.token_bytes(i) for i in range(0, 49152, 97))
    assert tokenizer.chat_template is not None
    assert (
        tokenizer.chat_template.render([{"role": "user", "content": "Hi"}]) == "<user>Hi<|im_end|>"
    )


@pytest.mark.slow
def test_metadata_overrides_the_config(
    smollm_json: Path, smollm: Tokenizer, smollm_metadata: dict[str, Any]
) -> None:
    (smollm_json.parent / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|endoftext|>"})
    )
    tokenizer = Tokenizer.from_file(smollm_json, metadata=smollm_metadata)
    assert (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)
    assert tokenizer.chat_template is not None and smollm.chat_template is not None
    assert tokenizer.chat_template.source == smollm.chat_template.source


def _spm_file(directory: Path) -> Path:
    """A Llama-style tokenizer.json: byte fallback, Metaspace, a post-processor adding <s>."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in ["▁", "h", "i", "▁h", "▁hi"]:
        vocab[piece] = len(vocab)
    backend = HFTokenizer(
        models.BPE(
            vocab=vocab,
            merges=[("▁", "h"), ("▁h", "i")],
            byte_fallback=True,
            fuse_unk=True,
            unk_token="<unk>",
        )
    )
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first", split=False
    )
    backend.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")]
    )
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    path = directory / "tokenizer.json"
    backend.save(str(path))
    return path


def test_sentencepiece_file(tmp_path: Path) -> None:
    path = _spm_file(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<s>",
                "eos_token": "</s>",
                "chat_template": [
                    {"name": "tool_use", "template": "x"},
                    {"name": "default", "template": TEMPLATE},
                ],
            }
        )
    )
    tokenizer = Tokenizer.from_file(path)
    assert tokenizer.style is TokenStyle.SENTENCEPIECE and tokenizer.add_space_prefix
    assert tokenizer.add_bos and not tokenizer.add_eos  # read off the post-processor
    hi = tokenizer.token_to_id("▁hi")
    assert tokenizer.encode("hi", add_special=True) == [1, hi]
    assert tokenizer.encode("hi ☃") == [
        hi,
        tokenizer.token_to_id("▁"),
        3 + 0xE2,
        3 + 0x98,
        3 + 0x83,
    ]
    assert tokenizer.token_bytes(3 + 0xE2) == b"\xe2" and tokenizer.token_bytes(hi) == b" hi"
    assert tokenizer.decode(tokenizer.encode("hi ☃")) == "hi ☃"
    assert tokenizer.is_special(1) and tokenizer.stop_ids == frozenset({2})
    assert tokenizer.chat_template is not None
    assert tokenizer.chat_template.render([{"role": "user", "content": "hi"}]) == "<user>hi</s>"


def test_chat_template_jinja_file(tmp_path: Path) -> None:
    path = _spm_file(tmp_path)
    (tmp_path / "chat_template.jinja").write_text(TEMPLATE)
    tokenizer = Tokenizer.from_file(path)
    assert tokenizer.bos_id is None and not tokenizer.add_bos  # no config: no special ids
    assert tokenizer.chat_template is not None and tokenizer.chat_template.source == TEMPLATE


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"model": {"type": "Nonsense"}}', "not a valid tokenizer.json"),
    ],
)
def test_unreadable_files(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "tokenizer.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(TokenizerError, match=message):
        Tokenizer.from_file(path)


def test_bad_config_flag(tmp_path: Path) -> None:
    path = _spm_file(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": "yes"}))
    with pytest.raises(TokenizerError, match="add_bos_token"):
        Tokenizer.from_file(path)


def test_truncation_and_padding_in_the_file_are_ignored(tmp_path: Path) -> None:
    path = _spm_file(tmp_path)
    backend = HFTokenizer.from_file(str(path))
    backend.enable_truncation(max_length=2)
    backend.enable_padding(length=8, pad_id=0, pad_token="<unk>")
    backend.save(str(path))
    tokenizer = Tokenizer.from_file(path)
    hi = tokenizer.token_to_id("▁hi")
    assert tokenizer.encode("hi hi hi") == [hi, hi, hi]  # not cut to 2
    assert tokenizer.encode("hi") == [hi]  # not padded to 8
