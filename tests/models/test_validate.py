"""Every count and shape of the metadata, checked against the tensor index before allocation.

Index-level cases change one number of a valid config or one tensor of a real file's index
and expect a :class:`ModelLoadError` naming the tensor (or key) with the shape found and the
shape expected; file-level cases go through ``load_model`` and ``LLM``.
"""

from __future__ import annotations

import dataclasses
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter

from rocmforge import LLM, SamplingParams
from rocmforge.attention import get_backend
from rocmforge.errors import ModelLoadError
from rocmforge.gguf import TensorInfo, read_gguf
from rocmforge.models import loader
from rocmforge.models.config import ModelConfig
from rocmforge.models.validate import (
    LAYER_LINEARS,
    LAYER_PARAMS,
    LINEAR_SHAPES,
    PARAM_SHAPES,
    PARAMS,
    check_tensors,
    check_vocabulary,
    checked_config,
)
from rocmforge.synthetic import SyntheticSpec, random_hf_weights, write_gguf

Index = dict[str, TensorInfo]
LLAMA = SyntheticSpec()  # vocab 320, hidden 64, ffn 128, 2 layers, 4 heads of 16, 2 KV heads
QWEN2 = SyntheticSpec(arch="qwen2", qkv_bias=True, tie_embeddings=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("validate")
    paths = {}
    for name, spec in (("llama", LLAMA), ("qwen2", QWEN2)):
        paths[name] = directory / f"{name}.gguf"
        write_gguf(paths[name], spec, random_hf_weights(spec, seed=3), seed=3)
    return paths


def _read(path: Path) -> tuple[ModelConfig, Index]:
    with read_gguf(path) as gguf:
        return checked_config(gguf), dict(gguf.tensors)


def _shape(name: str, *shape: int) -> Callable[[Index], None]:
    """Give tensor ``name`` the row-major ``shape`` in the index (added if absent)."""

    def apply(index: Index) -> None:
        index[name] = TensorInfo(name, tuple(reversed(shape)), GGMLQuantizationType.F32, 0, 4)

    return apply


def _drop(name: str) -> Callable[[Index], None]:
    def apply(index: Index) -> None:
        del index[name]

    return apply


def test_the_shape_tables_cover_the_loaders_name_tables() -> None:
    assert set(PARAM_SHAPES) == set(PARAMS) | set(LAYER_PARAMS)
    assert set(LINEAR_SHAPES) == set(LAYER_LINEARS) | {"lm_head"}
    for module, (weights, biases) in LAYER_LINEARS.items():
        rows, _ = LINEAR_SHAPES[module]
        assert len(rows) == len(weights) and len(biases) in (0, len(rows)), module


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_valid_files_pass(files: dict[str, Path], name: str) -> None:
    config, index = _read(files[name])
    check_tensors(config, index, files[name])
    assert config.num_layers == 2 and config.vocab_size == 320


CONFIG_CASES = {
    # field changed -> strings the error names (tensor, found shape, expected shape, key)
    "block_count-one-more": ({"num_layers": 3}, ["'blk.2.attn_norm.weight' is missing",
                                                 "'llama.block_count' is 3", "tensors for 2 layers"]),
    "head_count": ({"num_heads": 8, "head_dim": 8}, ["'blk.0.attn_k.weight'", "(32, 64)", "(16, 64)",
                                                     "llama.attention.head_count_kv x head_dim"]),
    "head_count_kv": ({"num_kv_heads": 4}, ["'blk.0.attn_k.weight'", "(32, 64)", "(64, 64)"]),
    "head_dim": ({"head_dim": 8}, ["'blk.0.attn_q.weight'", "(64, 64)", "(32, 64)",
                                   "llama.attention.head_count x head_dim"]),
    "hidden_size": ({"hidden_size": 32}, ["'token_embd.weight'", "(320, 64)", "(320, 32)",
                                          "llama.embedding_length"]),
    "ffn_size": ({"intermediate_size": 256}, ["'blk.0.ffn_gate.weight'", "(128, 64)", "(256, 64)",
                                              "llama.feed_forward_length"]),
    "vocab": ({"vocab_size": 321}, ["'token_embd.weight'", "(320, 64)", "(321, 64)", "token_embd rows"]),
}


@pytest.mark.parametrize("change,texts", CONFIG_CASES.values(), ids=CONFIG_CASES.keys())
def test_a_count_that_disagrees_with_the_tensors_names_both(files: dict[str, Path], change: dict,
                                                            texts: list[str]) -> None:
    config, index = _read(files["llama"])
    with pytest.raises(ModelLoadError) as caught:
        check_tensors(dataclasses.replace(config, **change), index, files["llama"])
    for text in texts:
        assert text in caught.value.message


def test_a_huge_block_count_costs_only_the_tensors_in_the_file(files: dict[str, Path]) -> None:
    config, index = _read(files["llama"])
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match=r"'llama\.block_count' is 1000000000000 but the file has tensors for 2"):
        check_tensors(dataclasses.replace(config, num_layers=10**12), index, files["llama"])
    assert time.perf_counter() - start < 0.1


INDEX_CASES = {
    # file, change to the index -> strings the error names
    "missing": ("llama", _drop("blk.1.ffn_up.weight"), ["'blk.1.ffn_up.weight' is missing"]),
    "missing-norm": ("llama", _drop("output_norm.weight"), ["'output_norm.weight' is missing"]),
    "matrix-1d": ("llama", _shape("blk.0.attn_q.weight", 4096), ["'blk.0.attn_q.weight'", "(4096,)", "(64, 64)"]),
    "matrix-3d": ("llama", _shape("blk.0.attn_v.weight", 2, 16, 64), ["'blk.0.attn_v.weight'", "(2, 16, 64)"]),
    "norm-2d": ("llama", _shape("blk.1.ffn_norm.weight", 1, 64), ["'blk.1.ffn_norm.weight'", "(1, 64)", "(64,)"]),
    "swapped": ("llama", _shape("blk.0.ffn_down.weight", 128, 64),
                ["'blk.0.ffn_down.weight'", "(128, 64)", "(64, 128)"]),
    "output-rows": ("llama", _shape("output.weight", 321, 64), ["'output.weight'", "(321, 64)", "(320, 64)"]),
    "output-swapped": ("qwen2", _shape("output.weight", 64, 320), ["'output.weight'", "(64, 320)", "(320, 64)"]),
    "rope_freqs": ("llama", _shape("rope_freqs.weight", 16), ["'rope_freqs.weight'", "(16,)", "(8,)", "head_dim / 2"]),
    "bias-missing": ("qwen2", _drop("blk.1.attn_k.bias"), ["'blk.1.attn_k.bias' is missing"]),
    "bias-length": ("qwen2", _shape("blk.0.attn_v.bias", 64), ["'blk.0.attn_v.bias'", "(64,)", "(32,)"]),
    "bias-2d": ("qwen2", _shape("blk.0.attn_q.bias", 1, 64), ["'blk.0.attn_q.bias'", "(1, 64)", "(64,)"]),
}


@pytest.mark.parametrize("file,change,texts", INDEX_CASES.values(), ids=INDEX_CASES.keys())
def test_a_tensor_of_the_wrong_shape_is_named_with_both_shapes(files: dict[str, Path], file: str,
                                                               change: Callable[[Index], None],
                                                               texts: list[str]) -> None:
    config, index = _read(files[file])
    change(index)
    with pytest.raises(ModelLoadError) as caught:
        check_tensors(config, index, files[file])
    for text in texts:
        assert text in caught.value.message


@pytest.mark.parametrize("change", [_shape("rope_freqs.weight", 8), _shape("output.weight", 320, 64),
                                    _shape("blk.0.attn_q.bias", 64), _shape("blk.9.attn_norm.weight", 64)],
                         ids=["rope_freqs", "untied-output", "bias-on-llama", "extra-layer"])
def test_optional_and_unused_tensors_pass(files: dict[str, Path], change: Callable[[Index], None]) -> None:
    config, index = _read(files["llama"])
    change(index)
    check_tensors(config, index, files["llama"])


def test_check_vocabulary() -> None:
    config = ModelConfig.from_gguf_metadata({
        "general.architecture": "llama", "llama.block_count": 2, "llama.context_length": 256,
        "llama.embedding_length": 64, "llama.feed_forward_length": 128, "llama.attention.head_count": 4,
    }, vocab_size=320)
    check_vocabulary(320, config, "m.gguf")
    check_vocabulary(300, config, "m.gguf")  # padded embedding
    with pytest.raises(ModelLoadError) as caught:
        check_vocabulary(321, config, "m.gguf")
    for text in ("m.gguf", "'tokenizer.ggml.tokens'", "'token_embd.weight'", "321", "320 rows"):
        assert text in caught.value.message


# --- through the loader and the LLM ----------------------------------------------------------


def _patch_u32(src: Path, dst: Path, key: str, value: int) -> Path:
    """``src`` with the UINT32 metadata ``key`` set to ``value``, in place of its bytes."""
    raw = bytearray(src.read_bytes())
    name = key.encode()
    at = raw.find(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    if struct.unpack_from("<I", raw, at)[0] != 4:  # GGUFValueType.UINT32
        raise ValueError(f"{key} is not a UINT32 in {src}")
    struct.pack_into("<I", raw, at + 4, value)
    dst.write_bytes(bytes(raw))
    return dst


def test_load_model_checks_before_it_allocates_the_model(files: dict[str, Path], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A block_count of a million with two layers of tensors: a typed error naming the key, and
    the model's modules are never built (they would be, from the claim, before any tensor)."""
    bad = _patch_u32(files["llama"], tmp_path / "million.gguf", "llama.block_count", 10**6)

    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was allocated before its tensors were checked")

    monkeypatch.setattr(loader, "LlamaForCausalLM", no_model)
    with pytest.raises(ModelLoadError, match=r"'llama\.block_count' is 1000000 but the file has tensors for 2 layers"):
        with read_gguf(bad) as gguf:
            loader.load_model(gguf, device=torch.device("cpu"), dtype=torch.float32, attention=get_backend())


def _rewrite(src: Path, dst: Path, tensors: dict[str, Callable[[np.ndarray], np.ndarray]] | None = None,
             metadata: dict[str, Callable[[Any], Any]] | None = None) -> Path:
    """Copy an fp32 GGUF file through ``GGUFWriter``, changing some tensors' data (their shape
    follows) and some metadata values (their type is kept)."""
    tensors, metadata = tensors or {}, metadata or {}
    with read_gguf(src) as gguf:
        writer = GGUFWriter(str(dst), gguf.metadata["general.architecture"])
        for key, value in gguf.metadata.items():
            if key == "general.architecture":
                continue
            types = gguf.metadata_types[key]
            value = metadata.get(key, lambda v: v)(value)
            writer.add_key_value(key, value, types[0], sub_type=types[1] if len(types) > 1 else None)
        for name, info in gguf.tensors.items():
            data = gguf.tensor_data(name).copy().view(np.float32).reshape(info.shape)
            writer.add_tensor(name, np.ascontiguousarray(tensors.get(name, lambda t: t)(data)))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return dst


def test_load_model_names_a_matrix_written_1d(files: dict[str, Path], tmp_path: Path) -> None:
    """A 2-D weight written 1-D used to reach ``torch.cat`` (a RuntimeError)."""
    bad = _rewrite(files["llama"], tmp_path / "1d.gguf", tensors={"blk.0.attn_k.weight": np.ravel})
    with pytest.raises(ModelLoadError, match=r"'blk\.0\.attn_k\.weight' has shape \(2048,\), expected \(32, 64\)"):
        with read_gguf(bad) as gguf:
            loader.load_model(gguf, device=torch.device("cpu"), dtype=torch.float32, attention=get_backend())


def test_llm_refuses_a_vocabulary_longer_than_the_embedding(files: dict[str, Path], tmp_path: Path) -> None:
    """More tokens than embedding rows used to load, then fail with IndexError on the first
    text that reached a high id."""
    extra = [f"<|extra_{i}|>" for i in range(4)]
    bad = _rewrite(files["llama"], tmp_path / "long-vocabulary.gguf", metadata={
        "tokenizer.ggml.tokens": lambda tokens: tokens + extra,
        "tokenizer.ggml.token_type": lambda types: types + [1] * len(extra),
    })
    with pytest.raises(ModelLoadError) as caught:
        llm = LLM(bad, device="cpu", dtype="float32", kv_cache_memory=8 << 20)
        llm.generate([llm.tokenizer.vocab_size - 1], SamplingParams(max_tokens=1, temperature=0.0))
    for text in ("'tokenizer.ggml.tokens'", "324", "'token_embd.weight'", "320 rows"):
        assert text in caught.value.message
