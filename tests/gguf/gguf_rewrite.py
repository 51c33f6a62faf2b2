"""Rewrite a GGUF file with a change: the semantic mutants of the mutation and summary tests.

In: a valid GGUF file (:func:`read_parts`). Out: :class:`Parts`, the file as plain values
(metadata with its types, tensor data by name), which the mutations below change in place
and :func:`write_parts` writes again with gguf-py's ``GGUFWriter``. Metadata keys written
``{arch}.…`` take the file's architecture prefix.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter

from rocmforge.gguf import read_gguf

QT = GGMLQuantizationType
VT = GGUFValueType


@dataclass
class Parts:
    kvs: dict[str, tuple[Any, GGUFValueType, GGUFValueType | None]]
    """key -> (value, value type, element type of an array)"""
    tensors: dict[str, np.ndarray]
    """F32/F16: the values in row-major shape; quantized: uint8 rows of blocks."""
    types: dict[str, GGMLQuantizationType]

    @property
    def arch(self) -> str:
        return self.kvs["general.architecture"][0]

    def key(self, key: str) -> str:
        return key.format(arch=self.arch)


def read_parts(path: Path) -> Parts:
    with read_gguf(path) as gguf:
        kvs = {}
        for key, value in gguf.metadata.items():
            types = gguf.metadata_types[key]
            kvs[key] = (value, types[0], types[1] if len(types) > 1 else None)
        tensors, types_ = {}, {}
        for name, info in gguf.tensors.items():
            raw = gguf.tensor_data(name).copy()
            if info.ggml_type == QT.F32:
                tensors[name] = raw.view(np.float32).reshape(info.shape)
            else:
                tensors[name] = raw.reshape(*info.shape[:-1], -1)
            types_[name] = info.ggml_type
    return Parts(kvs, tensors, types_)


def write_parts(parts: Parts, path: Path) -> None:
    writer = GGUFWriter(str(path), "unused")
    writer.kv_data[0].clear()  # the constructor's general.architecture: written (or not) below
    for key, (value, vtype, sub_type) in parts.kvs.items():
        writer.add_key_value(key, value, vtype, sub_type=sub_type)
    for name, data in parts.tensors.items():
        writer.add_tensor(name, data, raw_dtype=parts.types[name] if data.dtype == np.uint8 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def rewrite(src: Path, dst: Path, *mutations: Mutation) -> Path:
    """``src`` with ``mutations`` applied, written to ``dst``."""
    parts = read_parts(src)
    for mutation in mutations:
        mutation(parts)
    write_parts(parts, dst)
    return dst


# --- mutations: Parts -> None, in place ---------------------------------------------------

Mutation = Callable[[Parts], None]


def set_key(key: str, value: Any, vtype: GGUFValueType | None = None,
            sub_type: GGUFValueType | None = None) -> Mutation:
    """Set metadata ``key`` (``{arch}.…`` allowed), keeping its type unless one is given."""

    def apply(parts: Parts) -> None:
        full = parts.key(key)
        old_type = parts.kvs[full][1] if full in parts.kvs else VT.UINT32
        parts.kvs[full] = (value, vtype or old_type, sub_type)

    return apply


def drop_key(key: str) -> Mutation:
    def apply(parts: Parts) -> None:
        del parts.kvs[parts.key(key)]

    return apply


def set_arch(name: str) -> Mutation:
    """Rename the architecture and the prefix of every ``{old}.`` key with it."""

    def apply(parts: Parts) -> None:
        old = parts.arch
        parts.kvs = {(name + k[len(old):] if k.startswith(old + ".") else k): v for k, v in parts.kvs.items()}
        parts.kvs["general.architecture"] = (name, VT.STRING, None)

    return apply


def drop_tensor(*names: str) -> Mutation:
    def apply(parts: Parts) -> None:
        for name in names:
            del parts.tensors[name]

    return apply


def drop_layer(index: int) -> Mutation:
    def apply(parts: Parts) -> None:
        for name in [n for n in parts.tensors if n.startswith(f"blk.{index}.")]:
            del parts.tensors[name]

    return apply


def map_tensor(name: str, change: Callable[[np.ndarray], np.ndarray]) -> Mutation:
    def apply(parts: Parts) -> None:
        parts.tensors[name] = np.ascontiguousarray(change(parts.tensors[name]))

    return apply


def add_tensor(name: str, shape: tuple[int, ...]) -> Mutation:
    def apply(parts: Parts) -> None:
        parts.tensors[name] = np.ones(shape, dtype=np.float32)
        parts.types[name] = QT.F32

    return apply


def grow_vocabulary(extra: int) -> Mutation:
    """``extra`` more tokens (and token types): more than the embedding has rows."""

    def apply(parts: Parts) -> None:
        tokens, vtype, sub = parts.kvs["tokenizer.ggml.tokens"]
        parts.kvs["tokenizer.ggml.tokens"] = (tokens + [f"<|extra_{i}|>" for i in range(extra)], vtype, sub)
        types, vtype, sub = parts.kvs["tokenizer.ggml.token_type"]
        parts.kvs["tokenizer.ggml.token_type"] = (types + [1] * extra, vtype, sub)

    return apply


def pad_embedding(rows: int) -> Mutation:
    """``rows`` more embedding rows than tokens (padded embeddings are common)."""
    return map_tensor("token_embd.weight", lambda w: np.concatenate([w, np.zeros((rows, w.shape[1]), w.dtype)]))


def both(*mutations: Mutation) -> Mutation:
    def apply(parts: Parts) -> None:
        for mutation in mutations:
            mutation(parts)

    return apply
