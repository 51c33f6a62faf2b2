"""The tensors a llama-family model reads, and the shapes a config expects of them, checked
against the file's tensor index.

In: a :class:`~rocmforge.models.config.ModelConfig` (what the metadata claims) and the
tensor index of the GGUF file (name -> :class:`~rocmforge.gguf.TensorInfo`; no tensor data
is read), or the open :class:`~rocmforge.gguf.GGUFFile` for :func:`checked_config`.
Out: nothing when every tensor the architecture needs is present with the shape the config
implies; otherwise a :class:`~rocmforge.errors.ModelLoadError` that names the tensor (and
the metadata key behind a missing layer) with the shape found and the shape expected.

Why before anything is allocated: the model's modules are sized from the config, so once
every count and size in it agrees with a tensor of the file, building the model costs memory
in proportion to the file's tensors, never to what its metadata claims. The check walks the
tensors in order (globals, then layer 0, 1, ...) and stops at the first missing one, so a
``block_count`` of a billion costs as much as the tensors the file really has.

The tables below say which GGUF tensor feeds which model parameter (gguf-py's names; the
loader fills the model from them) and, keyed by the same parameter and module paths, the
shape each must have, every dimension named after the metadata it comes from::

    token_embd.weight, output.weight     (vocab, embedding_length)     vocab = token_embd rows
    output_norm, blk.i.attn_norm/ffn_norm (embedding_length,)
    blk.i.attn_q | attn_k | attn_v       (q | kv | kv, embedding_length)   q  = head_count x head_dim
    blk.i.attn_q/k/v.bias (qkv_bias)     (q | kv | kv,)                    kv = head_count_kv x head_dim
    blk.i.attn_output                    (embedding_length, q)
    blk.i.ffn_gate | ffn_up              (feed_forward_length, embedding_length)
    blk.i.ffn_down                       (embedding_length, feed_forward_length)
    rope_freqs.weight (optional)         (head_dim / 2,)
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from rocmforge.errors import ModelLoadError
from rocmforge.gguf import GGUFFile, TensorInfo
from rocmforge.models.config import ModelConfig

# Parameters filled directly: parameter path -> GGUF tensor name.
PARAMS: dict[str, str] = {
    "embed_tokens.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
}
LAYER_PARAMS: dict[str, str] = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
# Linear layers: module path -> (weight tensors, bias tensors), concatenated along the rows.
LAYER_LINEARS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "self_attn.qkv_proj": (("attn_q.weight", "attn_k.weight", "attn_v.weight"), ("attn_q.bias", "attn_k.bias", "attn_v.bias")),
    "self_attn.o_proj": (("attn_output.weight",), ()),
    "mlp.gate_up_proj": (("ffn_gate.weight", "ffn_up.weight"), ()),
    "mlp.down_proj": (("ffn_down.weight",), ()),
}
OUTPUT = "output.weight"  # absent when the output head is tied to the embeddings
ROPE_FREQS = "rope_freqs.weight"
EMBEDDING = PARAMS["embed_tokens.weight"]
TOKENS_KEY = "tokenizer.ggml.tokens"
_LAYER = re.compile(r"blk\.(\d+)\.")


@dataclass(frozen=True, slots=True)
class Dim:
    """One dimension of an expected shape: its size for a config, and where it comes from
    (``{arch}`` stands for the architecture's metadata prefix)."""

    source: str
    size: Callable[[ModelConfig], int]


VOCAB = Dim("token_embd rows", lambda c: c.vocab_size)
HIDDEN = Dim("{arch}.embedding_length", lambda c: c.hidden_size)
FFN = Dim("{arch}.feed_forward_length", lambda c: c.intermediate_size)
Q = Dim("{arch}.attention.head_count x head_dim", lambda c: c.q_size)
KV = Dim("{arch}.attention.head_count_kv x head_dim", lambda c: c.kv_size)
ROPE_PAIRS = Dim("head_dim / 2", lambda c: c.head_dim // 2)

# Parameter path (a key of PARAMS / LAYER_PARAMS) -> its shape.
PARAM_SHAPES: dict[str, tuple[Dim, ...]] = {
    "embed_tokens.weight": (VOCAB, HIDDEN),
    "norm.weight": (HIDDEN,),
    "input_layernorm.weight": (HIDDEN,),
    "post_attention_layernorm.weight": (HIDDEN,),
}
# Linear module (a key of LAYER_LINEARS, and the output head) -> (rows of each source tensor,
# in_features): weight i is (rows[i], in_features), bias i is (rows[i],).
LINEAR_SHAPES: dict[str, tuple[tuple[Dim, ...], Dim]] = {
    "self_attn.qkv_proj": ((Q, KV, KV), HIDDEN),
    "self_attn.o_proj": ((HIDDEN,), Q),
    "mlp.gate_up_proj": ((FFN, FFN), HIDDEN),
    "mlp.down_proj": ((HIDDEN,), FFN),
    "lm_head": ((VOCAB,), HIDDEN),
}


@dataclass(frozen=True, slots=True)
class ExpectedTensor:
    name: str
    dims: tuple[Dim, ...]
    required: bool = True
    layer: int | None = None
    """The ``blk.{layer}`` index, for per-layer tensors."""


def checked_config(gguf: GGUFFile) -> ModelConfig:
    """The model config of ``gguf``'s metadata, every count and shape in it checked against
    the tensor index (:func:`check_tensors`). Reads no tensor data, allocates nothing."""
    embedding = gguf.tensors.get(EMBEDDING)
    if embedding is None:
        raise ModelLoadError(f"{gguf.path}: required tensor {EMBEDDING!r} is missing")
    try:
        config = ModelConfig.from_gguf_metadata(gguf.metadata, vocab_size=embedding.shape[0])
    except ModelLoadError as exc:  # the same error, naming the file too
        raise type(exc)(f"{gguf.path}: {exc.message}", param=exc.param, **exc.details) from None
    check_tensors(config, gguf.tensors, gguf.path)
    return config


def check_tensors(config: ModelConfig, tensors: Mapping[str, TensorInfo], path: str | os.PathLike[str]) -> None:
    """Raise :class:`ModelLoadError` unless every tensor ``config`` needs is in ``tensors``
    with the shape the config implies (number of dims and each size). Tensors the model
    does not read are not checked (the loader logs them)."""
    for expected in expected_tensors(config):
        info = tensors.get(expected.name)
        if info is None:
            if expected.required:
                raise _missing(expected, config, tensors, path)
            continue
        shape = tuple(dim.size(config) for dim in expected.dims)
        if info.shape != shape:
            sources = ", ".join(dim.source.format(arch=config.arch.name) for dim in expected.dims)
            raise ModelLoadError(
                f"{path}: tensor {expected.name!r} has shape {info.shape}, expected {shape} = ({sources}) "
                "from the metadata",
                tensor=expected.name, found=info.shape, expected=shape,
            )


def expected_tensors(config: ModelConfig) -> Iterator[ExpectedTensor]:
    """Every tensor the model reads, in file order: globals, then layer by layer. Lazy, so
    a caller that stops at the first missing tensor never walks a claimed layer count."""
    for param, name in PARAMS.items():
        yield ExpectedTensor(name, PARAM_SHAPES[param])
    rows, cols = LINEAR_SHAPES["lm_head"]
    yield ExpectedTensor(OUTPUT, (*rows, cols), required=False)  # absent: tied to the embedding
    yield ExpectedTensor(ROPE_FREQS, (ROPE_PAIRS,), required=False)
    for i in range(config.num_layers):
        for param, name in LAYER_PARAMS.items():
            yield ExpectedTensor(f"blk.{i}.{name}", PARAM_SHAPES[param], layer=i)
        for module, (weights, biases) in LAYER_LINEARS.items():
            rows, cols = LINEAR_SHAPES[module]
            for weight, dim in zip(weights, rows, strict=True):
                yield ExpectedTensor(f"blk.{i}.{weight}", (dim, cols), layer=i)
            if config.arch.qkv_bias and biases:
                for bias, dim in zip(biases, rows, strict=True):
                    yield ExpectedTensor(f"blk.{i}.{bias}", (dim,), layer=i)


def check_vocabulary(tokenizer_vocab_size: int, config: ModelConfig, path: str | os.PathLike[str]) -> None:
    """Raise :class:`ModelLoadError` when the tokenizer can produce ids the embedding has no
    row for. Fewer tokens than rows is fine (embeddings are often padded)."""
    if tokenizer_vocab_size > config.vocab_size:
        raise ModelLoadError(
            f"{path}: the tokenizer has {tokenizer_vocab_size} tokens ({TOKENS_KEY!r}) but {EMBEDDING!r} has "
            f"{config.vocab_size} rows: ids {config.vocab_size} and up would index past the embedding",
            tensor=EMBEDDING, found=tokenizer_vocab_size, expected=config.vocab_size,
        )


def _missing(
    expected: ExpectedTensor, config: ModelConfig, tensors: Mapping[str, TensorInfo], path: str | os.PathLike[str]
) -> ModelLoadError:
    """The error for a required tensor that is absent; past the layers the file holds, it
    names ``block_count`` too."""
    message = f"{path}: required tensor {expected.name!r} is missing"
    if expected.layer is not None:
        layers = _layers_present(tensors)
        if expected.layer >= layers:
            key = f"{config.arch.name}.block_count"
            message += f": metadata {key!r} is {config.num_layers} but the file has tensors for {layers} layers"
    return ModelLoadError(message, tensor=expected.name)


def _layers_present(tensors: Mapping[str, TensorInfo]) -> int:
    """1 + the highest ``blk.{i}`` index among the tensors (0 without any)."""
    indices = [int(m.group(1)) for name in tensors if (m := _LAYER.match(name))]
    return max(indices, default=-1) + 1
