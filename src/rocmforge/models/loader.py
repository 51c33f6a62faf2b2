"""GGUF tensors -> a ready :class:`LlamaForCausalLM` on the target device.

In: an open :class:`~rocmforge.gguf.GGUFFile`, the device, the compute dtype and the weight
format. Out: the model with every parameter filled (Q/K rows in interleaved-RoPE order,
Q/K/V and gate/up fused) — dequantized, or as quantized layers where the format and device
allow — plus its config. Tensor bytes are read from the file by positioned reads into memory
of their own, once, never expanded where a quantized layer keeps them: the file's page-cache
pages are not mapped into the process, so the weights cost their size once. (On the CPU the
native kernels stream that copy: measured against streaming the mapped file's own pages,
every matmul of an 8B-shaped Q4_K_M file per decode token took 217 ms instead of 358 ms on
the 2-core machine of benchmarks/cpu_decode.py, where the page cache's scattered pages
cost the memory system more than one allocation does.)

Which GGUF tensor feeds which parameter is a data table (gguf-py's names), not code:
``PARAMS``, ``LAYER_PARAMS``, ``LAYER_LINEARS``, ``OUTPUT`` and ``ROPE_FREQS``, defined beside
the shapes they must have in :mod:`rocmforge.models.validate` (torch-free, so ``inspect`` can
check a file without importing torch) and used here. Before the model is built,
:func:`~rocmforge.models.validate.checked_config` checks every count and shape of the metadata
against the tensor index: a missing tensor or an unexpected shape is a typed error naming the
tensor before anything is allocated. An unsupported type is one when its tensor is decoded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from gguf import GGMLQuantizationType

from rocmforge import native
from rocmforge.attention import AttentionBackend
from rocmforge.errors import ModelLoadError
from rocmforge.gguf import GGUFFile, TensorInfo
from rocmforge.gguf.dequant import Q4_TYPES, dequantize, split_q4
from rocmforge.kernels import kernels_usable
from rocmforge.models.config import ModelConfig
from rocmforge.models.layers import Linear
from rocmforge.models.llama import LlamaForCausalLM
from rocmforge.models.validate import (
    LAYER_LINEARS,
    LAYER_PARAMS,
    OUTPUT,
    PARAMS,
    ROPE_FREQS,
    checked_config,
)
from rocmforge.quant import int4_cpu
from rocmforge.quant.gguf_embedding import GGUFEmbedding
from rocmforge.quant.gguf_linear import GGUFLinear

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]
"""Called with (tensors done, tensors total) while weights load."""

WeightFormat = str
"""``dense``: dequantize every weight to the compute dtype (exact; the reference path).
``quantized``: keep the weights quantized where the device has kernels for it: the GGUF
blocks themselves (:mod:`rocmforge.quant.gguf_linear`), read by Triton matmul kernels on a
GPU and by the native C++ kernels on the CPU (:mod:`rocmforge.native`: 8-bit activations,
integer dot products, as llama.cpp computes). Without the native kernels (no compiler) the
CPU falls back to torch's int4/int8 weight-only kernels (:mod:`rocmforge.quant.int4_cpu`:
4-bit weights repacked, the rest re-quantized to int8 per row; less accurate).
``auto``: ``quantized`` on a GPU and on a CPU with the native kernels, else ``dense``."""
WEIGHT_FORMATS = ("auto", "dense", "quantized")

QuantKernels = str
"""Which quantized linear layers ``quantized`` builds: ``auto`` (Triton on a GPU, native on
the CPU, torch's int4/int8 where the native kernels are missing), ``triton``, ``native`` or
``torch``. Only tests choose: ``triton`` on the CPU runs the GPU kernels under Triton's
interpreter."""


@dataclass(frozen=True, slots=True)
class LoadedModel:
    model: LlamaForCausalLM
    config: ModelConfig
    tied_embeddings: bool


def load_model(
    gguf: GGUFFile,
    *,
    device: torch.device,
    dtype: torch.dtype,
    attention: AttentionBackend,
    weight_format: WeightFormat = "auto",
    quant_kernels: QuantKernels = "auto",
    fused_kernels: bool | None = None,
    progress: ProgressCallback | None = None,
) -> LoadedModel:
    """``fused_kernels``: run the fused small ops (:meth:`LlamaForCausalLM.use_fused_kernels`):
    the native ones on the CPU with native kernels, else Triton's; None: on a GPU with Triton.
    The attention backend must then provide ``attend``."""
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"unknown weight format {weight_format!r} (have: {', '.join(WEIGHT_FORMATS)})")
    # Every count and shape the metadata claims, checked against the tensor index before
    # anything is allocated: from here on, memory follows the file's tensors.
    config = checked_config(gguf)
    loader = _TensorLoader(gguf, config, device)
    kernels = _quant_kernels(weight_format, quant_kernels, device)

    freq_factors = loader.dense(ROPE_FREQS, torch.float32) if ROPE_FREQS in gguf.tensors else None
    model = LlamaForCausalLM(config, attention, rope_freq_factors=freq_factors)
    tied = OUTPUT not in gguf.tensors

    params = dict(PARAMS)
    embedding = loader.gguf_embedding(kernels, config.hidden_size, dtype) if kernels in _BLOCK_KERNELS else None
    if embedding is not None:
        model.embed_tokens = embedding
        del params["embed_tokens.weight"]
    linears: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {} if tied else {"lm_head": ((OUTPUT,), ())}
    for i in range(config.num_layers):
        params.update({f"layers.{i}.{p}": f"blk.{i}.{name}" for p, name in LAYER_PARAMS.items()})
        for path, (weights, biases) in LAYER_LINEARS.items():
            bias_names = tuple(f"blk.{i}.{b}" for b in biases) if config.arch.qkv_bias else ()
            linears[f"layers.{i}.{path}"] = (tuple(f"blk.{i}.{w}" for w in weights), bias_names)

    total = len(params) + len(linears)
    named = dict(model.named_parameters())
    for done, (param_name, tensor_name) in enumerate(params.items(), start=1):
        _fill(named[param_name], loader.dense(tensor_name, dtype), (tensor_name,), gguf)
        _report(progress, done, total)
    for done, (module_name, (weights, biases)) in enumerate(linears.items(), start=len(params) + 1):
        bias = torch.cat([loader.dense(b, dtype) for b in biases]) if biases else None
        module = model.get_submodule(module_name)
        if not isinstance(module, Linear):
            raise TypeError(f"{module_name} is a {type(module).__name__}, not the dense layer the loader fills")
        shape = (module.out_features, module.in_features)
        replacement = loader.quantized_linear(kernels, weights, bias, shape) if kernels else None
        if replacement is not None:
            parent, _, attr = module_name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, replacement)
        else:
            _fill(module.weight, torch.cat([loader.dense(w, dtype) for w in weights]), weights, gguf)
            if bias is not None:
                _fill(module.get_parameter("bias"), bias, biases, gguf)
        _report(progress, done, total)
    if tied:
        if embedding is not None:  # the head reads the embedding's blocks: one copy on the device
            model.lm_head = GGUFLinear(
                [(embedding.blocks, embedding.ggml_type)], in_features=embedding.dim, kernels=embedding.kernels
            )
        elif kernels == "torch":
            model.lm_head = int4_cpu.Int8Linear(model.embed_tokens.get_parameter("weight"))
        else:
            model.lm_head.weight = model.embed_tokens.weight

    unused = sorted(set(gguf.tensors) - loader.consumed)
    if unused:
        logger.warning("ignoring %d tensors the model does not use: %s", len(unused), ", ".join(unused[:8]))
    model.rotary.to(device)
    if fused_kernels if fused_kernels is not None else device.type == "cuda" and kernels_usable(device):
        if device.type == "cpu" and kernels == "native":
            from rocmforge.native import fused

            model.use_fused_kernels(fused)
        else:
            model.use_fused_kernels()
    return LoadedModel(model=model.eval(), config=config, tied_embeddings=tied)


_BLOCK_KERNELS = ("triton", "native")
"""The kernel sets that read GGUF blocks as stored (:class:`GGUFLinear`, :class:`GGUFEmbedding`)."""


def resolve_weight_format(weight_format: WeightFormat, device: torch.device) -> str:
    """``auto`` -> ``quantized`` on a GPU and on a CPU with the native kernels, else
    ``dense``; others as they are."""
    if weight_format == "auto":
        return "quantized" if device.type == "cuda" or native.available() else "dense"
    return weight_format


def _quant_kernels(weight_format: WeightFormat, quant_kernels: QuantKernels, device: torch.device) -> str | None:
    """The quantized linear layers to build (``triton`` / ``native`` / ``torch``), or None
    for dense."""
    if resolve_weight_format(weight_format, device) != "quantized":
        return None
    if quant_kernels == "auto":
        quant_kernels = "triton" if device.type == "cuda" else "native" if native.available() else "torch"
    if quant_kernels == "triton" and kernels_usable(device):
        return "triton"
    if quant_kernels == "native" and device.type == "cpu" and native.available():
        return "native"
    if quant_kernels == "torch" and device.type == "cpu" and int4_cpu.available():
        return "torch"
    logger.warning("no %s quantized kernels usable on %s: dequantizing the weights", quant_kernels, device)
    return None


def placed_weight_bytes(gguf: GGUFFile, dtype: torch.dtype, weight_format: WeightFormat, device: torch.device) -> int:
    """Bytes the weights will take (checked against free memory before loading): GGUF block
    bytes for matrices the kernels read as stored (the embedding table too), bf16 for the
    native kernels' other matrices, ``dtype`` elements for everything else."""
    element = torch.empty((), dtype=dtype).element_size()
    kernels = None
    if resolve_weight_format(weight_format, device) == "quantized":
        kernels = "triton" if device.type == "cuda" else "native" if native.available() else None
    total = 0
    for info in gguf.tensors.values():
        matrix = len(info.shape) == 2
        if kernels and matrix and GGUFLinear.supports(info.ggml_type, info.shape[1], kernels):
            total += info.nbytes
        elif kernels == "native" and matrix:
            total += info.n_elements * 2
        else:
            total += info.n_elements * element
    return total


def _fill(param: torch.Tensor, tensor: torch.Tensor, sources: tuple[str, ...], gguf: GGUFFile) -> None:
    _check_shape(tensor.shape, tuple(param.shape), sources, gguf)
    param.data = tensor


def _report(progress: ProgressCallback | None, done: int, total: int) -> None:
    if progress is not None:
        progress(done, total)


class _TensorLoader:
    """Reads one GGUF tensor at a time: raw bytes -> device -> decoded -> Q/K interleaved."""

    def __init__(self, gguf: GGUFFile, config: ModelConfig, device: torch.device) -> None:
        self.gguf = gguf
        self.config = config
        self.device = device
        self.consumed: set[str] = set()
        self.dequantized_types: set[GGMLQuantizationType] = set()

    def dense(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        info, raw = self._raw(name)
        tensor = dequantize(raw, info.ggml_type, info.shape, dtype=torch.float32)
        return self._to_interleaved(name, tensor).to(dtype)

    def quantized_linear(
        self, kernels: str, weights: tuple[str, ...], bias: torch.Tensor | None, shape: tuple[int, int]
    ) -> torch.nn.Module | None:
        """The quantized layer for ``kernels``, or None where it keeps the weight dense (a
        float or unsupported type on the GPU)."""
        if kernels == "triton":
            return self._gguf_linear(weights, bias, shape)
        if kernels == "native":
            return self._native_linear(weights, bias, shape)
        return self._cpu_linear(weights, bias, shape)

    def gguf_embedding(self, kernels: str, dim: int, dtype: torch.dtype) -> GGUFEmbedding | None:
        """``token_embd`` kept in GGUF blocks, or None for a type the kernels do not decode
        (the native kernels take such a table as bf16 instead)."""
        info = self._info("token_embd.weight")
        if len(info.shape) != 2 or info.shape[1] != dim:
            return None
        if kernels == "native":
            rows, ggml_type = self._native_part("token_embd.weight")
            return GGUFEmbedding(rows, ggml_type, dim, dtype, kernels="native")
        if not GGUFLinear.supports(info.ggml_type, dim):
            return None
        _, raw = self._raw("token_embd.weight")
        return GGUFEmbedding(raw.view(info.shape[0], -1), info.ggml_type, dim, dtype)

    def _native_linear(
        self, weights: tuple[str, ...], bias: torch.Tensor | None, shape: tuple[int, int]
    ) -> torch.nn.Module:
        parts = [self._native_part(name) for name in weights]
        layer = GGUFLinear(parts, in_features=self._info(weights[0]).shape[1], bias=bias, kernels="native")
        _check_shape(torch.Size((layer.out_features, layer.in_features)), shape, weights, self.gguf)
        return layer

    def _native_part(self, name: str) -> tuple[torch.Tensor, GGMLQuantizationType]:
        """One weight for the native kernels: its blocks as stored (Q/K rows re-ordered where
        the architecture needs it), or for a type they do not compute on, the matrix
        dequantized once to bf16."""
        info = self._info(name)
        if len(info.shape) == 2 and GGUFLinear.supports(info.ggml_type, info.shape[1], "native"):
            _, raw = self._raw(name)
            return self._to_interleaved(name, raw.view(info.shape[0], -1)), info.ggml_type
        if info.ggml_type not in self.dequantized_types:
            self.dequantized_types.add(info.ggml_type)
            logger.info("no native CPU kernel for %s tensors (%s...): dequantizing them to bf16",
                        info.ggml_type.name, name)
        dense = self.dense(name, torch.bfloat16)
        return dense.view(torch.uint8).reshape(dense.shape[0], -1), GGMLQuantizationType.BF16

    def _gguf_linear(
        self, weights: tuple[str, ...], bias: torch.Tensor | None, shape: tuple[int, int]
    ) -> torch.nn.Module | None:
        infos = [self._info(w) for w in weights]
        if not all(len(info.shape) == 2 and GGUFLinear.supports(info.ggml_type, info.shape[1]) for info in infos):
            return None
        parts = []
        for name in weights:
            info, raw = self._raw(name)
            rows = raw.view(info.shape[0], -1)  # GGUF blocks run along a row: rows permute exactly
            parts.append((self._to_interleaved(name, rows), info.ggml_type))
        layer = GGUFLinear(parts, in_features=infos[0].shape[1], bias=bias)
        _check_shape(torch.Size((layer.out_features, layer.in_features)), shape, weights, self.gguf)
        return layer

    def _cpu_linear(
        self, weights: tuple[str, ...], bias: torch.Tensor | None, shape: tuple[int, int]
    ) -> torch.nn.Module:
        """An int4 linear layer when every source is 4-bit, else an int8 one."""
        infos = [self._info(w) for w in weights]
        if not all(info.ggml_type in Q4_TYPES and len(info.shape) == 2 for info in infos):
            weight = torch.cat([self.dense(w, torch.float32) for w in weights])
            _check_shape(weight.shape, shape, weights, self.gguf)
            return int4_cpu.Int8Linear(weight, bias)
        parts = []
        for name in weights:
            info, raw = self._raw(name)
            parts.append([self._to_interleaved(name, t) for t in split_q4(raw, info.ggml_type, info.shape)])
        codes, scale, zero = (torch.cat(column) for column in zip(*parts))
        _check_shape(codes.shape, shape, weights, self.gguf)
        return int4_cpu.Int4Linear(codes, scale, zero, bias)

    def _info(self, name: str) -> TensorInfo:
        info = self.gguf.tensors.get(name)
        if info is None:
            raise ModelLoadError(f"{self.gguf.path}: required tensor {name!r} is missing")
        return info

    def _raw(self, name: str) -> tuple[TensorInfo, torch.Tensor]:
        """The tensor's bytes on the device, read out of the file (not through the mapping)."""
        info = self._info(name)
        self.consumed.add(name)
        data = torch.empty(info.nbytes, dtype=torch.uint8)
        self.gguf.read_tensor_into(name, data.numpy())
        return info, data.to(self.device)

    def _to_interleaved(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Q/K rows (weights and biases) of rotate-half architectures -> interleaved pairs."""
        if self.config.arch.rope_interleaved:
            return tensor
        kind = name.split(".")[-2]
        heads = {"attn_q": self.config.num_heads, "attn_k": self.config.num_kv_heads}.get(kind)
        return interleave_qk_rows(tensor, heads) if heads else tensor


def _check_shape(actual: torch.Size, expected: tuple[int, ...], sources: tuple[str, ...], gguf: GGUFFile) -> None:
    if tuple(actual) != expected:
        raise ModelLoadError(
            f"{gguf.path}: tensor(s) {', '.join(sources)} have shape {tuple(actual)}, "
            f"expected {expected} for this model's hyper-parameters"
        )


def interleave_qk_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """llama.cpp's ``permute`` of Q/K rows: per head, rotate-half rows
    ``[x0 .. x(d/2-1) | y0 .. y(d/2-1)]`` become interleaved pairs ``[x0 y0 x1 y1 ...]``.
    Works on any tensor whose dim 0 is the rows (weights, biases, int4 codes and scales)."""
    rows = weight.shape[0]
    head_dim = rows // num_heads
    return (
        weight.reshape(num_heads, 2, head_dim // 2, *weight.shape[1:])
        .transpose(1, 2)
        .reshape(weight.shape)
    )
