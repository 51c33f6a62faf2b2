"""GGUF mutation test: no file crashes, hangs or exhausts memory in ``inspect`` or ``LLM``.

Three small valid files are written with :mod:`rocmforge.synthetic` (an fp32 llama with tied
embeddings; an fp32 qwen2 with Q/K/V biases and an output head; a Q8_0/Q4_0/Q5_1 llama with
llama-3 ``rope_freqs``), then mutated with a fixed seed into 542 files:

* 115 truncations: the empty file, and 38 per base (the header at 6 offsets, the last byte
  before the data, the data's first byte, the file's last byte, and at random offsets 10 in
  the hyper-parameter keys, 4 in the tokenizer arrays, 12 in the tensor index, 3 in the data);
* 324 byte flips, 108 per base of 1-3 bytes each: 10 in the 24-byte header, 30 in the
  hyper-parameter keys, 16 in the tokenizer arrays, 40 in the tensor index, 12 in the data;
* 103 semantic mutants rewritten with gguf-py's ``GGUFWriter`` (:data:`SEMANTIC`): counts that
  disagree with the tensors (block_count huge / 0 / one more, head counts not dividing, ...),
  keys of the wrong type or out of range, tensors missing, 1-D where 2-D is due, transposed,
  a vocabulary longer than the embedding, ... each with the outcome it must have.

A child process runs every mutant through what ``rocmforge inspect`` does (``summarize``,
the command's human and ``--json`` output) and through
``LLM(path, device="cpu", dtype="float32", kv_cache_memory=8 << 20)`` plus one greedy token
from the vocabulary's highest id. Each must succeed or raise a ``RocmForgeError``: no other
exception, no step over :data:`STEP_SECONDS`, and the child's peak RSS under
:data:`PEAK_RSS_BYTES` (measured: 277 MB). 9-18 s on a 2-core machine: the child imports in ~2 s,
then takes 15-30 ms per mutant.

The child is this file run as a script (``python test_mutations.py MANIFEST RESULTS``).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import io
import json
import logging
import os
import resource
import signal
import struct
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf_rewrite import (
    VT,
    Mutation,
    add_tensor,
    both,
    drop_key,
    drop_layer,
    drop_tensor,
    grow_vocabulary,
    map_tensor,
    pad_embedding,
    read_parts,
    set_arch,
    set_key,
    write_parts,
)

from rocmforge import LLM, SamplingParams
from rocmforge.cli import main as cli
from rocmforge.errors import RocmForgeError
from rocmforge.gguf import read_gguf
from rocmforge.gguf.summary import summarize
from rocmforge.synthetic import SyntheticSpec, TensorTypeChooser, all_f32, random_hf_weights, write_gguf

SEED = 20240611
STEP_SECONDS = 10.0
"""Bound on one step (inspect, or load + one token) of one mutant: the real ones take
milliseconds; a count from the file that drives a loop or an allocation takes minutes."""
PEAK_RSS_BYTES = 1536 << 20
"""Bound on the child's peak RSS. The child holds Python, torch and rocmforge (~270 MB on the
CPU build) plus one model of < 1 MB of weights and its 8 MiB KV cache at a time: 1.5 GB leaves
5x headroom for allocator noise, while a model built from a claim instead of the tensors (a
million layers of ~150 KB each) exceeds it within a second."""
CHILD_ADDRESS_SPACE_HEADROOM = 4 << 30
"""The child's address space may grow this much past its size after imports (RLIMIT_AS), so a
regression that allocates from a claim fails fast instead of swapping the machine."""
CHILD_SECONDS = 300

QT = GGMLQuantizationType
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}


# --- the base files ---------------------------------------------------------------------


def _quant_types(name: str) -> GGMLQuantizationType:
    if ".attn_" in name or name == "token_embd.weight":
        return QT.Q8_0
    return QT.Q5_1 if "ffn_down" in name else QT.Q4_0


BASES: dict[str, tuple[SyntheticSpec, TensorTypeChooser]] = {
    "llama": (SyntheticSpec(), all_f32),
    "qwen2": (SyntheticSpec(arch="qwen2", qkv_bias=True, tie_embeddings=False, rope_theta=1e6), all_f32),
    "quant": (SyntheticSpec(rope_scaling=LLAMA3_SCALING), _quant_types),
}


def write_bases(directory: Path) -> dict[str, Path]:
    paths = {}
    for index, (name, (spec, types)) in enumerate(BASES.items()):
        paths[name] = directory / f"base-{name}.gguf"
        write_gguf(paths[name], spec, random_hf_weights(spec, seed=SEED + index), tensor_type=types, seed=SEED + index)
    return paths


# --- semantic mutants ---------------------------------------------------------------------


@dataclass(frozen=True)
class Expect:
    """What loading a semantic mutant must do: succeed (``error`` None), or raise a subclass
    of ``error`` whose message holds every string of ``text``. ``in_summary``: the
    summary's ``hyperparameters`` holds that message too (a model error, not a tokenizer one)."""

    error: str | None = None
    text: tuple[str, ...] = ()
    in_summary: bool = True


LOADS = Expect()


def model_error(*text: str) -> Expect:
    return Expect("ModelLoadError", text)


def tokenizer_error(*text: str, error: str = "TokenizerError") -> Expect:
    return Expect(error, text, in_summary=False)


_BIG = 2**64 - 1
NO_ROPE_DIMS = drop_key("{arch}.rope.dimension_count")  # so that the head dim reaches the tensor check
LINEAR_ROPE = set_key("{arch}.rope.scaling.type", "linear", VT.STRING)
SEMANTIC: list[tuple[str, str, Mutation, Expect]] = [
    # block_count: the tensors of 2 layers, any claim
    ("block_count-million", "llama", set_key("{arch}.block_count", 10**6),
     model_error("blk.2.attn_norm.weight", "'llama.block_count' is 1000000", "2 layers")),
    ("block_count-u64-max", "llama", set_key("{arch}.block_count", _BIG, VT.UINT64),
     model_error("block_count", str(_BIG))),
    ("block_count-zero", "llama", set_key("{arch}.block_count", 0),
     model_error("'llama.block_count' must be a positive integer")),
    ("block_count-one-more", "llama", set_key("{arch}.block_count", 3),
     model_error("blk.2.attn_norm.weight", "block_count")),
    ("block_count-one-less", "llama", set_key("{arch}.block_count", 1), LOADS),
    ("block_count-negative", "llama", set_key("{arch}.block_count", -1, VT.INT32), model_error("block_count", "-1")),
    ("block_count-string", "llama", set_key("{arch}.block_count", "2", VT.STRING), model_error("block_count", "'2'")),
    ("block_count-float", "llama", set_key("{arch}.block_count", 2.0, VT.FLOAT32), model_error("block_count", "2.0")),
    ("block_count-array", "llama", set_key("{arch}.block_count", [2], VT.ARRAY, VT.INT32),
     model_error("block_count", "[2]")),
    ("block_count-bool", "llama", set_key("{arch}.block_count", True, VT.BOOL), model_error("block_count", "True")),
    ("block_count-missing", "llama", drop_key("{arch}.block_count"),
     Expect("MissingMetadataError", ("llama.block_count",))),
    ("block_count-million-quant", "quant", set_key("{arch}.block_count", 10**6),
     model_error("blk.2.attn_norm.weight", "block_count")),
    ("block_count-million-qwen2", "qwen2", set_key("{arch}.block_count", 10**6),
     model_error("blk.2.attn_norm.weight", "block_count")),
    # head counts (4 heads, 2 KV heads, head_dim 16, hidden 64)
    ("head_count-zero", "llama", set_key("{arch}.attention.head_count", 0),
     model_error("'llama.attention.head_count'")),
    ("head_count-3", "llama", set_key("{arch}.attention.head_count", 3),
     model_error("'llama.embedding_length' = 64 is not a multiple", "head_count")),
    ("head_count-8", "llama", set_key("{arch}.attention.head_count", 8),
     model_error("rope.dimension_count", "head_count")),
    ("head_count-8-no-rope-dims", "llama", both(set_key("{arch}.attention.head_count", 8), NO_ROPE_DIMS),
     model_error("blk.0.attn_k.weight", "(32, 64)", "(16, 64)")),
    ("head_count-1", "llama", set_key("{arch}.attention.head_count", 1),
     model_error("not a multiple", "head_count_kv")),
    ("head_count-u32-max", "llama", set_key("{arch}.attention.head_count", 2**32 - 1), model_error("not a multiple")),
    ("head_count-string", "llama", set_key("{arch}.attention.head_count", "4", VT.STRING), model_error("head_count")),
    ("head_count-missing", "llama", drop_key("{arch}.attention.head_count"),
     Expect("MissingMetadataError", ("llama.attention.head_count",))),
    ("head_count_kv-zero", "llama", set_key("{arch}.attention.head_count_kv", 0), model_error("head_count_kv")),
    ("head_count_kv-3", "llama", set_key("{arch}.attention.head_count_kv", 3),
     model_error("not a multiple", "head_count_kv")),
    ("head_count_kv-4", "llama", set_key("{arch}.attention.head_count_kv", 4),
     model_error("blk.0.attn_k.weight", "(32, 64)", "(64, 64)")),
    ("head_count_kv-1", "llama", set_key("{arch}.attention.head_count_kv", 1),
     model_error("blk.0.attn_k.weight", "(16, 64)")),
    ("head_count_kv-8", "llama", set_key("{arch}.attention.head_count_kv", 8), model_error("not a multiple")),
    ("head_count_kv-missing", "llama", drop_key("{arch}.attention.head_count_kv"),
     model_error("blk.0.attn_k.weight", "(64, 64)")),
    ("head_count_kv-4-qwen2", "qwen2", set_key("{arch}.attention.head_count_kv", 4),
     model_error("blk.0.attn_k.weight")),
    # head dim, hidden size, feed-forward size
    ("key_length-8", "llama", both(set_key("{arch}.attention.key_length", 8), NO_ROPE_DIMS),
     model_error("blk.0.attn_q.weight", "(64, 64)", "(32, 64)")),
    ("key_length-odd", "llama", both(set_key("{arch}.attention.key_length", 15), NO_ROPE_DIMS),
     model_error("must be even", "key_length")),
    ("key_length-huge", "llama", both(set_key("{arch}.attention.key_length", 2**40, VT.UINT64), NO_ROPE_DIMS),
     model_error("blk.0.attn_q.weight")),
    ("key_length-vs-rope-dims", "llama", set_key("{arch}.attention.key_length", 8),
     model_error("rope.dimension_count")),
    ("value_length-8", "llama", set_key("{arch}.attention.value_length", 8), model_error("value_length")),
    ("embedding_length-32", "llama", set_key("{arch}.embedding_length", 32),
     model_error("rope.dimension_count", "embedding_length")),
    ("embedding_length-32-no-rope-dims", "llama", both(set_key("{arch}.embedding_length", 32), NO_ROPE_DIMS),
     model_error("token_embd.weight", "(320, 64)", "(320, 32)")),
    ("embedding_length-128", "llama", both(set_key("{arch}.embedding_length", 128), NO_ROPE_DIMS),
     model_error("token_embd.weight", "(320, 128)")),
    ("embedding_length-zero", "llama", set_key("{arch}.embedding_length", 0), model_error("embedding_length")),
    ("embedding_length-huge", "llama", both(set_key("{arch}.embedding_length", 2**40, VT.UINT64), NO_ROPE_DIMS),
     model_error("token_embd.weight")),
    ("embedding_length-quant", "quant", both(set_key("{arch}.embedding_length", 128), NO_ROPE_DIMS),
     model_error("token_embd.weight")),
    ("feed_forward_length-64", "llama", set_key("{arch}.feed_forward_length", 64),
     model_error("blk.0.ffn_gate.weight", "(128, 64)", "(64, 64)")),
    ("feed_forward_length-huge", "llama", set_key("{arch}.feed_forward_length", 2**62, VT.UINT64),
     model_error("blk.0.ffn_gate.weight")),
    ("feed_forward_length-float", "llama", set_key("{arch}.feed_forward_length", 128.0, VT.FLOAT32),
     model_error("feed_forward_length")),
    ("feed_forward_length-qwen2", "qwen2", set_key("{arch}.feed_forward_length", 256),
     model_error("blk.0.ffn_gate.weight")),
    # other hyper-parameters: ranges and types
    ("context_length-zero", "llama", set_key("{arch}.context_length", 0), model_error("context_length")),
    ("context_length-one", "llama", set_key("{arch}.context_length", 1), model_error("context_length", "at least 2")),
    ("context_length-u64-max", "llama", set_key("{arch}.context_length", _BIG, VT.UINT64), LOADS),
    ("context_length-string", "llama", set_key("{arch}.context_length", "512", VT.STRING),
     model_error("context_length")),
    ("freq_base-zero", "llama", set_key("{arch}.rope.freq_base", 0.0), model_error("rope.freq_base")),
    ("freq_base-nan", "llama", set_key("{arch}.rope.freq_base", float("nan")), model_error("rope.freq_base")),
    ("freq_base-inf", "llama", set_key("{arch}.rope.freq_base", float("inf")), model_error("rope.freq_base")),
    ("freq_base-string", "llama", set_key("{arch}.rope.freq_base", "1e4", VT.STRING), model_error("rope.freq_base")),
    ("rms_eps-negative", "llama", set_key("{arch}.attention.layer_norm_rms_epsilon", -1e-5),
     model_error("layer_norm_rms_epsilon")),
    ("rms_eps-nan", "llama", set_key("{arch}.attention.layer_norm_rms_epsilon", float("nan")),
     model_error("layer_norm_rms_epsilon")),
    ("rope_scaling-yarn", "llama", set_key("{arch}.rope.scaling.type", "yarn", VT.STRING),
     model_error("not supported")),
    ("rope_scaling-int", "llama", set_key("{arch}.rope.scaling.type", 5, VT.INT32), model_error("not supported")),
    ("rope_scaling-factor-zero", "llama",
     both(LINEAR_ROPE, set_key("{arch}.rope.scaling.factor", 0.0, VT.FLOAT32)),
     model_error("rope.scaling.factor")),
    ("rope_scaling-factor-tiny", "llama",
     both(LINEAR_ROPE, set_key("{arch}.rope.scaling.factor", 1e-30, VT.FLOAT32)),
     LOADS),
    ("vocab_size-key", "llama", set_key("{arch}.vocab_size", 321), model_error("vocab_size", "321", "320")),
    ("architecture-gpt2", "llama", set_arch("gpt2"), Expect("UnsupportedArchitectureError", ("gpt2",))),
    ("architecture-missing", "llama", drop_key("general.architecture"),
     Expect("MissingMetadataError", ("general.architecture",))),
    ("architecture-int", "llama", set_key("general.architecture", 7, VT.UINT32),
     Expect("MissingMetadataError", ("general.architecture",))),
    ("architecture-llama-as-qwen2", "llama", set_arch("qwen2"), model_error("blk.0.attn_q.bias")),
    ("architecture-qwen2-as-llama", "qwen2", set_arch("llama"), LOADS),
    ("name-markup", "llama", set_key("general.name", "[/bold] [red]x", VT.STRING), LOADS),
    ("name-int", "llama", set_key("general.name", 5, VT.INT32), LOADS),
    # vocabulary vs embedding rows
    ("vocabulary-longer", "llama", grow_vocabulary(8),
     Expect("ModelLoadError", ("tokenizer.ggml.tokens", "token_embd.weight", "328", "320"))),
    ("vocabulary-longer-quant", "quant", grow_vocabulary(1),
     Expect("ModelLoadError", ("tokenizer.ggml.tokens", "token_embd.weight"))),
    ("embedding-padded", "llama", pad_embedding(16), LOADS),
    ("embedding-padded-qwen2", "qwen2",
     both(pad_embedding(16), map_tensor("output.weight", lambda w: np.concatenate([w, w[:16]]))),
     LOADS),
    ("embedding-shorter-than-output", "qwen2", pad_embedding(16),
     model_error("output.weight", "(320, 64)", "(336, 64)")),
    # tokenizer metadata
    ("tokens-missing", "llama", drop_key("tokenizer.ggml.tokens"),
     tokenizer_error("tokenizer.ggml.tokens", error="MissingMetadataError")),
    ("tokens-string", "llama", set_key("tokenizer.ggml.tokens", "abc", VT.STRING),
     tokenizer_error("tokenizer.ggml.tokens")),
    ("token_type-short", "llama", set_key("tokenizer.ggml.token_type", [1, 1], VT.ARRAY, VT.INT32),
     tokenizer_error("token_type")),
    ("bos-out-of-range", "llama", set_key("tokenizer.ggml.bos_token_id", 10**9, VT.UINT32),
     tokenizer_error("bos_token_id")),
    ("eos-negative", "llama", set_key("tokenizer.ggml.eos_token_id", -1, VT.INT32), tokenizer_error("eos_token_id")),
    ("tokenizer-model-unknown", "llama", set_key("tokenizer.ggml.model", "wordpiece", VT.STRING),
     tokenizer_error("wordpiece")),
    ("tokenizer-model-int", "llama", set_key("tokenizer.ggml.model", 3, VT.UINT32),
     tokenizer_error("tokenizer.ggml.model")),
    ("merges-garbage", "llama", set_key("tokenizer.ggml.merges", ["no-space-here", "x y z"], VT.ARRAY, VT.STRING),
     tokenizer_error()),
    ("chat_template-broken", "llama", set_key("tokenizer.chat_template", "{% for %}", VT.STRING),
     tokenizer_error(error="ChatTemplateError")),
    # tensors: missing, wrong number of dims, swapped dims, wrong sizes
    ("missing-ffn_up", "llama", drop_tensor("blk.1.ffn_up.weight"), model_error("blk.1.ffn_up.weight", "missing")),
    ("missing-token_embd", "llama", drop_tensor("token_embd.weight"), model_error("token_embd.weight", "missing")),
    ("missing-output_norm", "llama", drop_tensor("output_norm.weight"), model_error("output_norm.weight", "missing")),
    ("missing-layer-0", "llama", drop_layer(0), model_error("blk.0.attn_norm.weight", "missing")),
    ("missing-rope_freqs", "quant", drop_tensor("rope_freqs.weight"), LOADS),
    ("missing-bias", "qwen2", drop_tensor("blk.1.attn_v.bias"), model_error("blk.1.attn_v.bias", "missing")),
    ("attn_q-1d", "llama", map_tensor("blk.0.attn_q.weight", np.ravel),
     model_error("blk.0.attn_q.weight", "(4096,)", "(64, 64)")),
    ("token_embd-1d", "llama", map_tensor("token_embd.weight", np.ravel), model_error("token_embd.weight", "(20480,)")),
    ("attn_norm-2d", "llama", map_tensor("blk.1.attn_norm.weight", lambda w: w[None, :]),
     model_error("blk.1.attn_norm.weight", "(1, 64)", "(64,)")),
    ("attn_q-3d", "llama", map_tensor("blk.0.attn_q.weight", lambda w: w.reshape(4, 16, 64)),
     model_error("blk.0.attn_q.weight", "(4, 16, 64)")),
    ("ffn_down-swapped", "llama", map_tensor("blk.0.ffn_down.weight", np.transpose),
     model_error("blk.0.ffn_down.weight", "(128, 64)", "(64, 128)")),
    ("attn_k-swapped", "llama", map_tensor("blk.1.attn_k.weight", np.transpose),
     model_error("blk.1.attn_k.weight", "(64, 32)", "(32, 64)")),
    ("token_embd-swapped", "llama", map_tensor("token_embd.weight", np.transpose),
     model_error("token_embd.weight", "(64, 320)")),
    ("output-swapped", "qwen2", map_tensor("output.weight", np.transpose),
     model_error("output.weight", "(64, 320)", "(320, 64)")),
    ("attn_v-half-rows", "llama", map_tensor("blk.0.attn_v.weight", lambda w: w[:16]),
     model_error("blk.0.attn_v.weight", "(16, 64)", "(32, 64)")),
    ("bias-short", "qwen2", map_tensor("blk.0.attn_k.bias", lambda b: b[:16]),
     model_error("blk.0.attn_k.bias", "(16,)", "(32,)")),
    ("bias-2d", "qwen2", map_tensor("blk.0.attn_q.bias", lambda b: b[None, :]),
     model_error("blk.0.attn_q.bias", "(1, 64)")),
    ("output-extra-row", "llama", add_tensor("output.weight", (321, 64)), model_error("output.weight", "(321, 64)")),
    ("output-untied", "llama", add_tensor("output.weight", (320, 64)), LOADS),
    ("rope_freqs-short", "quant", map_tensor("rope_freqs.weight", lambda f: f[:7]),
     model_error("rope_freqs.weight", "(7,)", "(8,)")),
    ("rope_freqs-2d", "llama", add_tensor("rope_freqs.weight", (1, 8)), model_error("rope_freqs.weight", "(1, 8)")),
    ("rope_freqs-added", "llama", add_tensor("rope_freqs.weight", (8,)), LOADS),
    ("extra-layer-tensor", "llama", add_tensor("blk.7.attn_norm.weight", (64,)), LOADS),
    ("norm-f16", "llama", map_tensor("output_norm.weight", lambda w: w.astype(np.float16)), LOADS),
]


# --- byte-level mutants: truncations and flips -------------------------------------------


@dataclass(frozen=True)
class Regions:
    """Byte ranges of one file: header, hyper-parameter keys, tokenizer arrays, tensor index, data."""

    header: range
    hparams: range
    tokenizer: range
    index: range
    data: range


def regions(path: Path) -> Regions:
    raw = path.read_bytes()
    with read_gguf(path) as gguf:
        first_tensor = next(iter(gguf.tensors)).encode()
        data_offset = gguf.data_offset

    def record(name: bytes) -> int:
        at = raw.find(struct.pack("<Q", len(name)) + name)
        if at < 0:
            raise ValueError(f"{name!r} not found in {path}")
        return at

    tokens, index = record(b"tokenizer.ggml.tokens"), record(first_tensor)
    return Regions(range(0, 24), range(24, tokens), range(tokens, index), range(index, data_offset),
                   range(data_offset, len(raw)))


HEADER_CUTS = (1, 4, 8, 16, 23, 24)
CUTS_PER_REGION = {"hparams": 10, "tokenizer": 4, "index": 12, "data": 3}
"""Truncations per base: the header cuts, the last byte before the data, the data's first and
the file's last byte, and these many at random offsets in each region."""
FLIPS_PER_REGION = {"header": 10, "hparams": 30, "tokenizer": 16, "index": 40, "data": 12}
MUTANTS_PER_BASE = len(HEADER_CUTS) + 3 + sum(CUTS_PER_REGION.values()) + sum(FLIPS_PER_REGION.values())


def byte_mutants(base: str, path: Path, directory: Path, rng: np.random.Generator) -> list[Path]:
    raw = path.read_bytes()
    spans = regions(path)
    cuts = [*HEADER_CUTS, spans.data.start - 1, spans.data.start, len(raw) - 1]
    for region, count in CUTS_PER_REGION.items():
        cuts += sorted(int(at) for at in rng.choice(getattr(spans, region), count, replace=False))
    out = []
    for cut in cuts:
        out.append(directory / f"truncated-{base}-{cut}.gguf")
        out[-1].write_bytes(raw[:cut])
    for region, count in FLIPS_PER_REGION.items():
        span = getattr(spans, region)
        for i in range(count):
            mutated = bytearray(raw)
            for at in rng.choice(span, int(rng.integers(1, 4)), replace=False):
                kind = rng.random()
                if kind < 0.5:
                    mutated[at] ^= 1 << int(rng.integers(8))
                elif kind < 0.8:
                    mutated[at] = int(rng.integers(256))
                else:
                    mutated[at] = 0xFF if rng.random() < 0.5 else 0x00
            out.append(directory / f"flip-{base}-{region}-{i}.gguf")
            out[-1].write_bytes(bytes(mutated))
    return out


# --- the parent: write the mutants, run the child, judge its report ----------------------


def write_mutants(directory: Path) -> list[dict[str, Any]]:
    """Every mutant as a manifest entry: name, path, and the expectation of semantic ones."""
    bases = write_bases(directory)
    rng = np.random.default_rng(SEED)
    empty = directory / "truncated-empty.gguf"
    empty.write_bytes(b"")
    manifest: list[dict[str, Any]] = [{"name": empty.stem, "path": str(empty), "expect": None}]
    for base, path in bases.items():
        manifest += [{"name": p.stem, "path": str(p), "expect": None} for p in byte_mutants(base, path, directory, rng)]
    parts = {base: read_parts(path) for base, path in bases.items()}
    for name, base, mutation, expect in SEMANTIC:
        mutant = copy.deepcopy(parts[base])
        mutation(mutant)
        path = directory / f"semantic-{name}.gguf"
        write_parts(mutant, path)
        manifest.append({"name": name, "path": str(path), "expect": expect.__dict__})
    return manifest


def run_child(manifest: list[dict[str, Any]], directory: Path) -> tuple[list[dict[str, Any]], int, str]:
    """Run the mutants in a child process: (its per-mutant results, its peak RSS in bytes,
    its stderr). The child is killed after :data:`CHILD_SECONDS`."""
    manifest_path, results_path = directory / "manifest.json", directory / "results.jsonl"
    manifest_path.write_text(json.dumps(manifest))
    with open(directory / "child.stderr", "w+") as stderr:
        proc = subprocess.Popen([sys.executable, __file__, str(manifest_path), str(results_path)],
                                stdout=stderr, stderr=stderr)
        killer = threading.Timer(CHILD_SECONDS, proc.kill)
        killer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            killer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        stderr.seek(0)
        log = stderr.read()
    results = [json.loads(line) for line in results_path.read_text().splitlines()] if results_path.exists() else []
    if proc.returncode != 0:
        raise AssertionError(f"the child exited with {proc.returncode} after {len(results)} mutants:\n{log[-4000:]}")
    return results, usage.ru_maxrss * 1024, log


def _judge(entry: dict[str, Any], result: dict[str, Any]) -> list[str]:
    """What is wrong with one mutant's result (nothing, for a pass)."""
    problems = []
    for step in ("inspect", "llm"):
        outcome = result[step]
        if outcome["outcome"] not in ("ok", "typed"):
            problems.append(f"{step}: {outcome['outcome']} {outcome.get('type')}: {outcome.get('message')}\n"
                            f"{outcome.get('traceback', '')}")
        if outcome["seconds"] > STEP_SECONDS:
            problems.append(f"{step} took {outcome['seconds']:.1f} s")
    expect = entry["expect"]
    if expect is None or problems:
        return problems
    llm = result["llm"]
    if expect["error"] is None:
        if llm["outcome"] != "ok":
            problems.append(f"should load, raised {llm['type']}: {llm['message']}")
    elif llm["outcome"] != "typed" or expect["error"] not in llm["mro"]:
        got = f"{llm['outcome']} {llm.get('type')}: {llm.get('message')}"
        problems.append(f"should raise {expect['error']}, got {got}")
    else:
        problems += [f"message lacks {text!r}: {llm['message']}" for text in expect["text"]
                     if text not in llm["message"]]
    if result["inspect"]["outcome"] != "ok":
        problems.append(f"inspect of a well-formed file failed: {result['inspect']['message']}")
    elif expect["error"] and expect["in_summary"]:
        summary_error = result["inspect"]["model_error"] or ""
        problems += [f"summary error lacks {text!r}: {summary_error!r}" for text in expect["text"]
                     if text not in summary_error]
    elif expect["error"] is None and result["inspect"]["model_error"]:
        problems.append(f"summary reports an error for a loadable file: {result['inspect']['model_error']}")
    return problems


def test_mutated_gguf_files_never_crash_hang_or_exhaust_memory(tmp_path: Path) -> None:
    manifest = write_mutants(tmp_path)
    assert len(manifest) == 1 + len(BASES) * MUTANTS_PER_BASE + len(SEMANTIC) == 542
    results, peak_rss, log = run_child(manifest, tmp_path)
    assert [r["name"] for r in results] == [e["name"] for e in manifest], log[-4000:]

    failures = {e["name"]: p for e, r in zip(manifest, results) if (p := _judge(e, r))}
    assert not failures, "\n".join(f"{name}: {'; '.join(p)}" for name, p in failures.items())
    assert peak_rss < PEAK_RSS_BYTES, f"peak RSS {peak_rss >> 20} MiB"
    # The mutants exercise both sides: some still load (and generate), most are refused.
    loaded = sum(r["llm"]["outcome"] == "ok" for r in results)
    assert 50 <= loaded <= len(results) // 2, loaded


# --- the child ----------------------------------------------------------------------------


class _StepTimeout(BaseException):
    """Raised by the alarm in a step that runs past :data:`STEP_SECONDS` (a BaseException,
    so library code that catches Exception cannot swallow it)."""


def _on_alarm(signum: int, frame: Any) -> None:
    raise _StepTimeout()


def _step(action: Callable[[], Any]) -> tuple[dict[str, Any], Any]:
    """Run ``action`` under the alarm: its outcome record and its value (None if it raised)."""
    start = time.perf_counter()
    signal.setitimer(signal.ITIMER_REAL, STEP_SECONDS)
    value, record = None, {"outcome": "ok"}
    try:
        value = action()
    except _StepTimeout:
        record = {"outcome": "hang", "type": "timeout", "message": f"over {STEP_SECONDS} s"}
    except RocmForgeError as exc:
        record = {"outcome": "typed", "type": type(exc).__name__, "message": str(exc),
                  "mro": [cls.__name__ for cls in type(exc).__mro__]}
    except BaseException as exc:
        record = {"outcome": "crash", "type": type(exc).__name__, "message": str(exc)[:2000],
                  "traceback": traceback.format_exc()[-3000:]}
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    record["seconds"] = time.perf_counter() - start
    return record, value


def _inspect(path: Path) -> str | None:
    """What ``rocmforge inspect`` does, human and JSON output; the summary's model error."""
    with read_gguf(path) as gguf:
        summary = summarize(gguf)
    json.dumps(summary)
    with contextlib.redirect_stdout(io.StringIO()):
        cli.inspect(path, as_json=False)
        cli.inspect(path, as_json=True)
    hyper = summary["hyperparameters"] or {}
    return hyper.get("error")


def _load_and_generate(path: Path) -> None:
    """Load the file, then one greedy token from the highest id the tokenizer has."""
    llm = LLM(path, device="cpu", dtype="float32", kv_cache_memory=8 << 20)
    llm.generate([[llm.tokenizer.vocab_size - 1]], SamplingParams(max_tokens=1, temperature=0.0))


def _limit_address_space() -> None:
    """RLIMIT_AS: the current size (imports done) plus :data:`CHILD_ADDRESS_SPACE_HEADROOM`."""
    with open("/proc/self/statm") as statm:
        size = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    soft = size + CHILD_ADDRESS_SPACE_HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))


def child_main(manifest_path: Path, results_path: Path) -> None:
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)  # the loader warns about the unused tensors of many mutants
    _limit_address_space()
    signal.signal(signal.SIGALRM, _on_alarm)
    gc.freeze()  # the imports' objects: each collection below then scans only the last mutant's
    with open(results_path, "w") as results:
        for entry in json.loads(manifest_path.read_text()):
            path = Path(entry["path"])
            inspect_record, model_error = _step(functools.partial(_inspect, path))
            inspect_record["model_error"] = model_error
            llm_record, _ = _step(functools.partial(_load_and_generate, path))
            gc.collect()
            results.write(json.dumps({"name": entry["name"], "inspect": inspect_record, "llm": llm_record}) + "\n")
            results.flush()


if __name__ == "__main__":
    child_main(Path(sys.argv[1]), Path(sys.argv[2]))
