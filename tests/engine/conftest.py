"""Fixtures of the engine acceptance tests: a tiny random-weight llama GGUF, LLMs on it."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from tiny_engine import TINY_SPEC, TinyModel

from rocmforge import LLM
from rocmforge.gguf import read_gguf
from rocmforge.synthetic import random_hf_weights, write_gguf
from rocmforge.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama.gguf"
    held = write_gguf(path, TINY_SPEC, random_hf_weights(TINY_SPEC, seed=11), seed=11)
    return TinyModel(path, TINY_SPEC, held)


@pytest.fixture(scope="module")
def make_llm(tiny_model: TinyModel) -> Callable[..., LLM]:
    """``make_llm(**kw)``: a fresh fp32, dense-weight CPU ``LLM`` on the tiny model."""

    def make(**kw) -> LLM:
        return LLM(tiny_model.path, device="cpu", dtype="float32", weight_format="dense", **kw)

    return make


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model: TinyModel) -> Tokenizer:
    with read_gguf(tiny_model.path) as gguf:
        return Tokenizer.from_gguf_metadata(gguf.metadata)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The tiny model's ops are microseconds; with several OpenMP threads on a small, busy
    machine each parallel region can cost milliseconds of thread wake-up. One thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
