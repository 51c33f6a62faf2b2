"""Fixtures of the structured-output tests: the tiny synthetic vocabulary (a real byte-level
BPE of 320 tokens, with ChatML control tokens) and a grammar compiler on it."""

from __future__ import annotations

from pathlib import Path

import pytest

from rocmforge.gguf import read_gguf
from rocmforge.structured.compiler import GrammarCompiler
from rocmforge.synthetic import SyntheticSpec, random_hf_weights, write_gguf
from rocmforge.tokenizer import Tokenizer

SPEC = SyntheticSpec(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1)


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("structured") / "tiny.gguf"
    write_gguf(path, SPEC, random_hf_weights(SPEC, seed=3), seed=3)
    return path


@pytest.fixture(scope="session")
def tokenizer(tiny_path: Path) -> Tokenizer:
    with read_gguf(tiny_path) as gguf:
        return Tokenizer.from_gguf_metadata(gguf.metadata)


@pytest.fixture(scope="session")
def compiler(tokenizer: Tokenizer) -> GrammarCompiler:
    return GrammarCompiler(tokenizer)
