"""A human- and machine-readable summary of a GGUF file (``rocmforge inspect``).

In: an open :class:`GGUFFile`. Out: a JSON-serialisable dict with the architecture, the
hyper-parameters, the tokenizer, every tensor (type, shape, bytes), the quantization mix,
the parameter count and an estimate of the memory needed to run it.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from rocmforge.errors import RocmForgeError
from rocmforge.gguf.reader import GGUFFile
from rocmforge.models.config import ModelConfig

_LARGE_ARRAY = 16


def summarize(gguf: GGUFFile) -> dict[str, Any]:
    tensors = list(gguf.tensors.values())
    params = sum(t.n_elements for t in tensors)
    weight_bytes = sum(t.nbytes for t in tensors)
    by_type: Counter[str] = Counter()
    bytes_by_type: Counter[str] = Counter()
    for t in tensors:
        by_type[t.ggml_type.name] += t.n_elements
        bytes_by_type[t.ggml_type.name] += t.nbytes
    summary: dict[str, Any] = {
        "path": str(gguf.path),
        "gguf_version": gguf.version,
        "architecture": gguf.metadata.get("general.architecture"),
        "name": gguf.metadata.get("general.name"),
        "file_bytes": gguf.path.stat().st_size,
        "parameters": params,
        "weight_bytes": weight_bytes,
        "bits_per_weight": round(8 * weight_bytes / params, 3) if params else 0.0,
        "quantization": {
            name: {"parameters": n, "fraction": round(n / params, 4), "bytes": bytes_by_type[name]}
            for name, n in by_type.most_common()
        },
        "tokenizer": {
            "model": gguf.metadata.get("tokenizer.ggml.model"),
            "pre": gguf.metadata.get("tokenizer.ggml.pre"),
            "vocab_size": len(gguf.metadata.get("tokenizer.ggml.tokens", [])),
            "has_chat_template": "tokenizer.chat_template" in gguf.metadata,
        },
        "metadata": {k: _short(v) for k, v in gguf.metadata.items()},
        "tensors": [
            {"name": t.name, "type": t.ggml_type.name, "shape": list(t.shape), "bytes": t.nbytes} for t in tensors
        ],
    }
    summary["hyperparameters"], summary["memory"] = _model_estimates(gguf, params)
    return summary


def _model_estimates(gguf: GGUFFile, params: int) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Hyper-parameters and a memory estimate, when the architecture is one we run."""
    embd = gguf.tensors.get("token_embd.weight")
    if embd is None:
        return None, None
    try:
        config = ModelConfig.from_gguf_metadata(gguf.metadata, vocab_size=embd.shape[0])
    except RocmForgeError as exc:
        return {"error": exc.message}, None
    hyper = {
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_layers": config.num_layers,
        "num_heads": config.num_heads,
        "num_kv_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "rope_theta": config.rope_theta,
        "rms_norm_eps": config.rms_norm_eps,
        "context_length": config.max_context,
        "tied_embeddings": "output.weight" not in gguf.tensors,
    }
    kv_per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim
    memory = {
        "weights_fp32_bytes": params * 4,
        "weights_bf16_bytes": params * 2,
        "kv_cache_bytes_per_token_fp32": kv_per_token * 4,
        "kv_cache_bytes_per_token_bf16": kv_per_token * 2,
        "kv_cache_full_context_bf16_bytes": kv_per_token * 2 * config.max_context,
    }
    return hyper, memory


def _short(value: Any) -> Any:
    """Metadata for display: long arrays (vocabularies) are summarised, not dumped."""
    if isinstance(value, list) and len(value) > _LARGE_ARRAY:
        return {"array_length": len(value), "head": value[:4]}
    if isinstance(value, str) and len(value) > 200:
        return value[:200] + f"... ({len(value)} chars)"
    return value
