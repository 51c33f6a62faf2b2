"""``rocmforge inspect`` on files whose metadata is odd: a summary every time, never a crash.

Each file is a valid synthetic llama rewritten with one change (:mod:`gguf_rewrite`). A value
of the wrong type is shown as None where a string is due; a model rocmforge cannot build
(a bad count, a shape that disagrees with it, a vocabulary longer than the embedding) puts the
loader's error, naming the key or tensor, in ``hyperparameters``; the human output shows what
the file holds literally, brackets included.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gguf_rewrite import VT, Mutation, drop_key, drop_tensor, grow_vocabulary, rewrite, set_key
from typer.testing import CliRunner

from rocmforge.cli.main import app
from rocmforge.gguf import read_gguf
from rocmforge.gguf.summary import summarize
from rocmforge.synthetic import SyntheticSpec, random_hf_weights, write_gguf


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("summary") / "base.gguf"
    spec = SyntheticSpec()
    write_gguf(path, spec, random_hf_weights(spec, seed=5), seed=5)
    return path


def _summary(base: Path, tmp_path: Path, *mutations: Mutation) -> dict:
    with read_gguf(rewrite(base, tmp_path / "changed.gguf", *mutations)) as gguf:
        summary = summarize(gguf)
    json.dumps(summary)  # what --json prints
    return summary


def test_a_valid_file(base: Path, tmp_path: Path) -> None:
    summary = _summary(base, tmp_path)
    assert summary["hyperparameters"]["num_layers"] == 2 and summary["memory"]["weights_fp32_bytes"] > 0
    names = (summary["name"], summary["architecture"], summary["tokenizer"]["vocab_size"])
    assert names == ("synthetic-llama", "llama", 320)


BAD_MODELS = {
    # change -> what the hyperparameters error names
    "head_count-zero": (set_key("{arch}.attention.head_count", 0), ["'llama.attention.head_count'", "got 0"]),
    "block_count-string": (set_key("{arch}.block_count", "2", VT.STRING), ["'llama.block_count'", "'2'"]),
    "block_count-negative": (set_key("{arch}.block_count", -3, VT.INT32), ["'llama.block_count'", "-3"]),
    "block_count-huge": (set_key("{arch}.block_count", 2**64 - 1, VT.UINT64),
                         ["'llama.block_count' is 18446744073709551615", "'blk.2.attn_norm.weight' is missing"]),
    "block_count-one-more": (set_key("{arch}.block_count", 3), ["'blk.2.attn_norm.weight' is missing"]),
    "context_length-array": (set_key("{arch}.context_length", [512] * 100, VT.ARRAY, VT.UINT32),
                             ["'llama.context_length'"]),
    "feed_forward_length-missing": (drop_key("{arch}.feed_forward_length"), ["'llama.feed_forward_length'"]),
    "architecture-missing": (drop_key("general.architecture"), ["'general.architecture'"]),
    "head_count_kv-vs-tensors": (set_key("{arch}.attention.head_count_kv", 4),
                                 ["'blk.0.attn_k.weight'", "(32, 64)", "(64, 64)"]),
    "token_embd-missing": (drop_tensor("token_embd.weight"), ["'token_embd.weight' is missing"]),
    "vocabulary-longer": (grow_vocabulary(3), ["'tokenizer.ggml.tokens'", "323", "'token_embd.weight'", "320 rows"]),
}


@pytest.mark.parametrize("change,texts", BAD_MODELS.values(), ids=BAD_MODELS.keys())
def test_a_model_that_cannot_be_built_is_summarised_with_the_reason(base: Path, tmp_path: Path, change: Mutation,
                                                                    texts: list[str]) -> None:
    summary = _summary(base, tmp_path, change)
    assert summary["memory"] is None and len(summary["tensors"]) > 0
    error = summary["hyperparameters"]["error"]
    for text in texts:
        assert text in error


def test_values_of_the_wrong_type_are_shown_as_none(base: Path, tmp_path: Path) -> None:
    summary = _summary(base, tmp_path, set_key("general.name", 7, VT.INT32),
                       set_key("tokenizer.ggml.tokens", 320, VT.UINT32), set_key("tokenizer.ggml.pre", 1.5, VT.FLOAT32))
    assert summary["name"] is None
    assert summary["tokenizer"]["vocab_size"] is None and summary["tokenizer"]["pre"] is None
    assert summary["metadata"]["general.name"] == 7  # the raw value is still listed
    assert summary["hyperparameters"]["num_layers"] == 2  # the tokenizer does not decide the model


def test_a_file_without_tensors_has_no_model_section(base: Path, tmp_path: Path) -> None:
    def no_tensors(parts) -> None:
        parts.tensors.clear()

    summary = _summary(base, tmp_path, no_tensors)
    assert summary["hyperparameters"] is None and summary["memory"] is None and summary["parameters"] == 0


def test_the_human_output_shows_brackets_from_the_file_as_text(base: Path, tmp_path: Path) -> None:
    """Names from the file are not rich markup: ``[/bold]`` used to raise MarkupError."""
    path = rewrite(base, tmp_path / "markup.gguf", set_key("general.name", "[/bold][red]odd", VT.STRING),
                   set_key("{arch}.block_count", 3))
    result = CliRunner().invoke(app, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    assert "[/bold][red]odd" in result.output
    assert "error" in result.output  # the hyper-parameter table's one row: the loader's reason
