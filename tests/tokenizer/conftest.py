"""Fixtures for the tokenizer tests: the real model's metadata, our tokenizer and its HF oracle.

The real model's metadata is read once per session with gguf-py's ``GGUFReader`` (the
slowest step, ~3 s); the HF transformers oracle is built once from the same file.  The
synthetic vocabularies live in ``synthetic_vocabs.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rocmforge.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def smollm_metadata(default_gguf: Path) -> dict[str, Any]:
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(default_gguf)
    return {
        name: field.contents()
        for name, field in reader.fields.items()
        if name.startswith(("tokenizer.", "general."))
    }


@pytest.fixture(scope="session")
def smollm(smollm_metadata: dict[str, Any]) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(smollm_metadata)


@pytest.fixture(scope="session")
def hf_smollm(default_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """transformers' own GGUF tokenizer for the default model, loaded offline.

    ``PreTrainedTokenizerFast.from_pretrained(dir, gguf_file=...)`` runs the same GGUF
    tokenizer conversion as ``AutoTokenizer`` but skips building the model config, which
    re-parses the whole file (~7 s).
    """
    transformers = pytest.importorskip("transformers")
    model_dir = tmp_path_factory.mktemp("hf_gguf")
    (model_dir / default_gguf.name).symlink_to(default_gguf)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("TRANSFORMERS_OFFLINE", "1")
        try:
            tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(
                model_dir, gguf_file=default_gguf.name
            )
        except (ImportError, OSError, ValueError) as exc:
            pytest.skip(f"transformers cannot load the GGUF tokenizer: {exc}")
        yield tokenizer
