"""GGUF tensors -> a ready :class:`LlamaForCausalLM` on the target device.

In: an open :class:`~rocmforge.gguf.GGUFFile`, the device and the compute dtype.
Out: the model with every parameter filled (dequantized, Q/K rows un-permuted where the
architecture's converter permuted them, Q/K/V and gate/up fused), plus its config.

Which GGUF tensor feeds which parameter is the data table below (gguf-py's names), not code.
Every missing tensor, unexpected shape or unsupported type is a typed error naming the tensor.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rocmforge.attention import AttentionBackend
from rocmforge.errors import ModelLoadError
from rocmforge.gguf import GGUFFile
from rocmforge.gguf.dequant import dequantize
from rocmforge.models.config import ModelConfig
from rocmforge.models.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]
"""Called with (tensors done, tensors total) while weights load."""

# parameter path -> GGUF tensor names concatenated along the output rows.
GLOBAL_TENSORS: dict[str, tuple[str, ...]] = {
    "embed_tokens.weight": ("token_embd.weight",),
    "norm.weight": ("output_norm.weight",),
    "lm_head.weight": ("output.weight",),  # absent when embeddings are tied
}
LAYER_TENSORS: dict[str, tuple[str, ...]] = {
    "input_layernorm.weight": ("attn_norm.weight",),
    "self_attn.qkv_proj.weight": ("attn_q.weight", "attn_k.weight", "attn_v.weight"),
    "self_attn.qkv_proj.bias": ("attn_q.bias", "attn_k.bias", "attn_v.bias"),  # qkv_bias archs only
    "self_attn.o_proj.weight": ("attn_output.weight",),
    "post_attention_layernorm.weight": ("ffn_norm.weight",),
    "mlp.gate_up_proj.weight": ("ffn_gate.weight", "ffn_up.weight"),
    "mlp.down_proj.weight": ("ffn_down.weight",),
}
ROPE_FREQS = "rope_freqs.weight"


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
    progress: ProgressCallback | None = None,
) -> LoadedModel:
    if "token_embd.weight" not in gguf.tensors:
        raise ModelLoadError(f"{gguf.path}: required tensor 'token_embd.weight' is missing")
    vocab_size = gguf.tensors["token_embd.weight"].shape[0]
    config = ModelConfig.from_gguf_metadata(gguf.metadata, vocab_size=vocab_size)
    loader = _TensorLoader(gguf, config, device)

    freq_factors = loader.load(ROPE_FREQS, torch.float32) if ROPE_FREQS in gguf.tensors else None
    model = LlamaForCausalLM(config, attention, rope_freq_factors=freq_factors)

    plan = _plan(config, gguf)
    tied = "output.weight" not in gguf.tensors
    params = dict(model.named_parameters())
    for done, (param_name, sources) in enumerate(plan, start=1):
        tensor = torch.cat([loader.load(name, dtype) for name in sources], dim=0)
        target = params[param_name]
        if tensor.shape != target.shape:
            raise ModelLoadError(
                f"{gguf.path}: tensor(s) {', '.join(sources)} have shape {tuple(tensor.shape)}, "
                f"expected {tuple(target.shape)} for this model's hyper-parameters"
            )
        target.data = tensor
        if progress is not None:
            progress(done, len(plan))
    if tied:
        model.lm_head.weight = model.embed_tokens.weight

    unused = sorted(set(gguf.tensors) - loader.consumed)
    if unused:
        logger.warning("ignoring %d tensors the model does not use: %s", len(unused), ", ".join(unused[:8]))
    model.rotary.to(device)
    return LoadedModel(model=model.eval(), config=config, tied_embeddings=tied)


def _plan(config: ModelConfig, gguf: GGUFFile) -> list[tuple[str, tuple[str, ...]]]:
    """(parameter, source tensors) for every parameter the model needs, in file terms."""
    plan = [
        (param, sources)
        for param, sources in GLOBAL_TENSORS.items()
        if not (param == "lm_head.weight" and sources[0] not in gguf.tensors)
    ]
    for i in range(config.num_layers):
        for param, sources in LAYER_TENSORS.items():
            if param.endswith(".bias") and not config.arch.qkv_bias:
                continue
            plan.append((f"layers.{i}.{param}", tuple(f"blk.{i}.{s}" for s in sources)))
    return plan


class _TensorLoader:
    """Reads one GGUF tensor at a time: raw bytes -> device -> dequantized -> un-permuted."""

    def __init__(self, gguf: GGUFFile, config: ModelConfig, device: torch.device) -> None:
        self.gguf = gguf
        self.config = config
        self.device = device
        self.consumed: set[str] = set()

    def load(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        info = self.gguf.tensors.get(name)
        if info is None:
            raise ModelLoadError(f"{self.gguf.path}: required tensor {name!r} is missing")
        self.consumed.add(name)
        raw = torch.from_numpy(self.gguf.tensor_data(name).copy()).to(self.device)
        tensor = dequantize(raw, info.ggml_type, info.shape, dtype=torch.float32)
        if self.config.arch.qk_permuted:
            if name.endswith("attn_q.weight"):
                tensor = unpermute_qk(tensor, self.config.num_heads)
            elif name.endswith("attn_k.weight"):
                tensor = unpermute_qk(tensor, self.config.num_kv_heads)
        return tensor.to(dtype)


def unpermute_qk(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's ``permute`` of Q/K rows (interleaved RoPE pairs -> rotate-half halves).

    Per head the converter maps rows ``[x0 .. x(d/2-1) | y0 .. y(d/2-1)]`` to
    ``[x0 y0 x1 y1 ...]``; this is the inverse. Works on any tensor whose dim 0 is the rows.
    """
    rows = weight.shape[0]
    head_dim = rows // num_heads
    return (
        weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:])
        .transpose(1, 2)
        .reshape(weight.shape)
    )
