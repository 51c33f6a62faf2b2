"""Model hyper-parameters from GGUF metadata: required keys, consistency, typed errors."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from gguf import GGUFWriter

from rocmforge.attention import get_backend
from rocmforge.errors import MissingMetadataError, ModelLoadError, UnsupportedArchitectureError
from rocmforge.gguf import read_gguf
from rocmforge.models.config import ModelConfig
from rocmforge.models.loader import load_model
from rocmforge.synthetic import SyntheticSpec, random_hf_weights, write_gguf

BASE = {
    "general.architecture": "llama",
    "llama.block_count": 2,
    "llama.context_length": 256,
    "llama.embedding_length": 64,
    "llama.feed_forward_length": 128,
    "llama.attention.head_count": 4,
    "llama.attention.head_count_kv": 2,
    "llama.rope.freq_base": 10000.0,
    "llama.attention.layer_norm_rms_epsilon": 1e-5,
}


def test_valid_metadata() -> None:
    config = ModelConfig.from_gguf_metadata(BASE, vocab_size=100)
    assert (config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim) == (2, 4, 2, 16)
    assert config.arch.rope_interleaved and not config.arch.qkv_bias


@pytest.mark.parametrize(
    "key", ["llama.block_count", "llama.embedding_length", "llama.feed_forward_length",
            "llama.attention.head_count", "llama.context_length"]
)
def test_missing_required_key(key: str) -> None:
    metadata = {k: v for k, v in BASE.items() if k != key}
    with pytest.raises(MissingMetadataError, match=key.replace(".", r"\.")):
        ModelConfig.from_gguf_metadata(metadata, vocab_size=100)


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("llama.attention.head_count_kv", 3, "not a multiple"),
        ("llama.embedding_length", 66, "not a multiple"),
        ("llama.block_count", 0, "positive integer"),
        ("llama.block_count", "two", "positive integer"),
        ("llama.rope.freq_base", -1.0, "positive number"),
        ("llama.vocab_size", 99, "vocab_size"),
        ("llama.rope.dimension_count", 8, "partial rotary"),
        ("llama.rope.scaling.type", "yarn", "not supported"),
    ],
)
def test_inconsistent_metadata(key: str, value: object, message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        ModelConfig.from_gguf_metadata({**BASE, key: value}, vocab_size=100)


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("llama.context_length", 1, r"'llama\.context_length' must be an integer of at least 2, got 1"),
        ("llama.rope.freq_base", float("inf"), r"'llama\.rope\.freq_base' must be a positive number, got inf"),
        ("llama.attention.head_count_kv", 3, r"'llama\.attention\.head_count' = 4 is not a multiple of "
                                             r"'llama\.attention\.head_count_kv' = 3"),
        ("llama.embedding_length", 66, r"'llama\.embedding_length' = 66 is not a multiple of "
                                       r"'llama\.attention\.head_count'"),
        ("llama.attention.value_length", 8, r"'llama\.attention\.value_length' differs from the head dimension 16"),
        ("llama.rope.dimension_count", 8, r"'llama\.rope\.dimension_count' other than the head dimension 16 = "
                                          r"'llama\.embedding_length' / 'llama\.attention\.head_count'"),
    ],
)
def test_errors_name_the_full_key_and_refuse_values_nothing_can_run(key: str, value: object, message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        ModelConfig.from_gguf_metadata({**BASE, key: value}, vocab_size=100)


def test_a_whole_array_where_a_number_is_due_is_cut_short_in_the_message() -> None:
    with pytest.raises(ModelLoadError, match="block_count") as caught:
        ModelConfig.from_gguf_metadata({**BASE, "llama.block_count": list(range(100_000))}, vocab_size=100)
    assert len(caught.value.message) < 200


def test_unknown_architecture() -> None:
    with pytest.raises(UnsupportedArchitectureError, match="gpt-neox"):
        ModelConfig.from_gguf_metadata({**BASE, "general.architecture": "gpt-neox"}, vocab_size=100)


def _rewrite(src: Path, dst: Path, drop_key: str | None = None, drop_tensor: str | None = None,
             reshape: str | None = None) -> None:
    """Copy a GGUF file, dropping one metadata key or tensor (or transposing a tensor)."""
    with read_gguf(src) as gguf:
        writer = GGUFWriter(str(dst), gguf.metadata["general.architecture"])
        for key, value in gguf.metadata.items():
            if key in ("general.architecture", drop_key) or key.startswith("GGUF."):
                continue
            types = gguf.metadata_types[key]
            writer.add_key_value(key, value, types[0], sub_type=types[1] if len(types) > 1 else None)
        for name, info in gguf.tensors.items():
            if name == drop_tensor:
                continue
            data = gguf.tensor_data(name).copy().view("float32").reshape(info.shape)
            writer.add_tensor(name, data.T.copy() if name == reshape else data)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()


@pytest.mark.parametrize(
    "change,error,message",
    [
        ({"drop_key": "llama.block_count"}, MissingMetadataError, "llama.block_count"),
        ({"drop_tensor": "blk.1.ffn_up.weight"}, ModelLoadError, "blk.1.ffn_up.weight"),
        ({"reshape": "blk.0.ffn_down.weight"}, ModelLoadError, "blk.0.ffn_down.weight"),
    ],
)
def test_loading_a_broken_model_file_is_a_typed_error(tmp_path: Path, change: dict, error: type, message: str) -> None:
    spec = SyntheticSpec()
    good = tmp_path / "good.gguf"
    write_gguf(good, spec, random_hf_weights(spec))
    bad = tmp_path / "bad.gguf"
    _rewrite(good, bad, **change)
    start = time.perf_counter()
    with pytest.raises(error, match=message.replace(".", r"\.")), read_gguf(bad) as gguf:
        load_model(gguf, device=torch.device("cpu"), dtype=torch.float32, attention=get_backend())
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("value,name", [(0, "none"), (1, "mean"), (2, "cls"), (3, "last"), (4, "rank")])
def test_pooling_type_is_read_by_llama_cpp_enum(value: int, name: str) -> None:
    config = ModelConfig.from_gguf_metadata({**BASE, "llama.pooling_type": value}, vocab_size=100)
    assert config.pooling_type == name


def test_no_pooling_type_key_is_none() -> None:
    assert ModelConfig.from_gguf_metadata(BASE, vocab_size=100).pooling_type is None


@pytest.mark.parametrize("value", [5, -1, "mean", 1.0, True])
def test_unknown_pooling_type_is_refused_naming_the_key(value: object) -> None:
    with pytest.raises(ModelLoadError, match=r"llama\.pooling_type"):
        ModelConfig.from_gguf_metadata({**BASE, "llama.pooling_type": value}, vocab_size=100)
