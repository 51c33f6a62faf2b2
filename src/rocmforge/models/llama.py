"""The llama family (llama 1-3, mistral, qwen2, SmolLM) as pure torch modules.

In: flattened token ids ``[T]``, their positions ``[T]`` and the step's
:class:`~rocmforge.attention.AttentionMetadata`. Out: final hidden states ``[T, hidden]``;
:meth:`LlamaForCausalLM.compute_logits` projects the rows the caller needs to the vocabulary.

The KV cache tensors belong to the model runner, which binds them to the attention layers
with :meth:`LlamaForCausalLM.bind_kv_cache`. Q/K/V and gate/up projections are fused into one
matmul each (``qkv_proj``, ``gate_up_proj``), as the weight loader lays them out.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from rocmforge.attention import AttentionBackend, AttentionMetadata
from rocmforge.models.config import ModelConfig
from rocmforge.models.layers import Embedding, Linear, RMSNorm, RotaryEmbedding, apply_rotary


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = config.q_size
        self.kv_size = config.kv_size
        self.scale = self.head_dim**-0.5
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.arch.qkv_bias)
        self.o_proj = Linear(self.q_size, config.hidden_size)
        self.backend = backend
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        self.kernels: ModuleType | None = None
        """:mod:`rocmforge.kernels.fused` when RoPE and the KV write run as one kernel."""

    def forward(
        self,
        x: torch.Tensor,
        rotation: tuple[torch.Tensor, torch.Tensor],
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        if self.k_cache is None or self.v_cache is None:
            raise RuntimeError("KV cache not bound: the model runner must call bind_kv_cache first")
        tokens = x.shape[0]
        qk, v = self.qkv_proj(x).split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        # Q and K heads rotate together: one RoPE call over [tokens, heads + kv_heads, head_dim].
        qk = qk.reshape(tokens, self.num_heads + self.num_kv_heads, self.head_dim)
        v = v.reshape(tokens, self.num_kv_heads, self.head_dim)
        if self.kernels is not None:
            cos, sin = rotation
            q = self.kernels.apply_rotary_and_write_kv(
                qk, v, cos, sin, self.k_cache, self.v_cache, metadata.slot_mapping, self.num_heads
            )
            out = self.backend.attend(q, self.k_cache, self.v_cache, metadata, self.scale)
        else:
            q, k = apply_rotary(qk, rotation).split([self.num_heads, self.num_kv_heads], dim=1)
            out = self.backend.forward(q, k, v, self.k_cache, self.v_cache, metadata, self.scale)
        return self.o_proj(out.reshape(tokens, self.q_size))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size)
        self.kernels: ModuleType | None = None
        """:mod:`rocmforge.kernels.fused` when SiLU-and-mul runs as one kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.kernels is not None:
            return self.down_proj(self.kernels.silu_and_mul(gate_up))
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, backend)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        rotation: tuple[torch.Tensor, torch.Tensor],
        metadata: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, residual)`` -> the layer's output delta and the residual stream before it:
        the stream after the layer is their sum, which the next norm computes fused."""
        if residual is None:
            residual = x
            x = self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, rotation, metadata)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


LayerKernel = Callable[
    [DecoderLayer, torch.Tensor, "torch.Tensor | None", tuple[torch.Tensor, torch.Tensor], AttentionMetadata],
    "tuple[torch.Tensor, torch.Tensor] | None",
]
"""``(layer, x, residual, rotation, metadata) -> (delta, residual)``, or None to let the
layer's modules run the step."""


class LlamaForCausalLM(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        backend: AttentionBackend,
        rope_freq_factors: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        # nn.Module: the loader may put a GGUF-block embedding and a quantized head here.
        self.embed_tokens: nn.Module = Embedding(config.vocab_size, config.hidden_size)
        self.rotary = RotaryEmbedding(
            config.head_dim,
            config.rope_theta,
            freq_factors=rope_freq_factors,
            position_scale=config.rope_scaling.factor if config.rope_scaling else 1.0,
        )
        self.decoder_layers = [DecoderLayer(config, backend) for _ in range(config.num_layers)]
        """The layers, typed (``layers`` holds the same modules, registered)."""
        self.layers = nn.ModuleList(self.decoder_layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # Tied embeddings: the loader points lm_head.weight at the embedding matrix.
        self.lm_head: nn.Module = Linear(config.hidden_size, config.vocab_size)
        self.layer_kernel: LayerKernel | None = None
        """A whole layer in one call where it can run the step (``decoder_layer`` of the
        fused-kernel module, :mod:`rocmforge.native.fused`); it returns None otherwise."""

    def bind_kv_cache(self, caches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Attach the runner's per-layer (K, V) cache tensors to the attention layers."""
        if len(caches) != len(self.decoder_layers):
            raise ValueError(f"expected {len(self.decoder_layers)} KV cache pairs, got {len(caches)}")
        for layer, (k_cache, v_cache) in zip(self.decoder_layers, caches):
            layer.self_attn.k_cache = k_cache
            layer.self_attn.v_cache = v_cache

    def unbind_kv_cache(self) -> None:
        """Drop the references to a runner's cache tensors (a discarded profiling runner's
        pool is freed only then)."""
        for layer in self.decoder_layers:
            layer.self_attn.k_cache = layer.self_attn.v_cache = None

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        rotation = self.rotary(positions)
        residual = None  # the first layer starts the residual stream (block_count >= 1)
        for layer in self.decoder_layers:
            fused = self.layer_kernel(layer, x, residual, rotation, metadata) if self.layer_kernel else None
            x, residual = fused if fused is not None else layer(x, residual, rotation, metadata)
        return self.norm(x, residual)[0]

    def use_fused_kernels(self, fused: ModuleType | None = None) -> None:
        """Run RMSNorm + residual add, RoPE + KV write and SiLU-and-mul as fused kernels:
        ``fused`` is :mod:`rocmforge.kernels.fused` (Triton: a GPU, or tests under Triton's
        interpreter; the default) or :mod:`rocmforge.native.fused` (the CPU). The attention
        backend must provide ``attend``. A module with a ``decoder_layer`` function (the
        native one) also runs each layer of a decode step as one call."""
        if fused is None:
            from rocmforge.kernels import fused

        for module in self.modules():
            if isinstance(module, (RMSNorm, Attention, MLP)):
                module.kernels = fused
        self.layer_kernel = getattr(fused, "decoder_layer", None)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Project hidden states ``[N, hidden]`` to fp32 logits ``[N, vocab]``."""
        return self.lm_head(hidden).float()
