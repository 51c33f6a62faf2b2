"""A human- and machine-readable summary of a GGUF file (``rocmforge inspect``).

In: an open :class:`GGUFFile`. Out: a JSON-serialisable dict with the architecture, the
hyper-parameters, the tokenizer, every tensor (type, shape, bytes), the quantization mix,
the parameter count and an estimate of the memory needed to run it.

Any file the reader accepts gets a summary: metadata of the wrong type or out of range is
shown as it is (``architecture``/``name``/``model``/``pre`` are None unless strings), and
when the hyper-parameters do not describe a model rocmforge can build (a missing key, a
count that disagrees with the tensors, more tokens than embedding rows: the checks of
:mod:`rocmforge.models.validate`, the same the loader runs), ``hyperparameters`` holds the
error message instead and ``memory`` is None. Torch is not imported.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from rocmforge.errors import RocmForgeError
from rocmforge.gguf.reader import GGUFFile
from rocmforge.models.validate import OUTPUT, TOKENS_KEY, check_vocabulary, checked_config

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
        "architecture": _string(gguf, "general.architecture"),
        "name": _string(gguf, "general.name"),
        "file_bytes": gguf.path.stat().st_size,
        "parameters": params,
        "weight_bytes": weight_bytes,
        "bits_per_weight": round(8 * weight_bytes / params, 3) if params else 0.0,
        "quantization": {
            name: {"parameters": n, "fraction": round(n / params, 4), "bytes": bytes_by_type[name]}
            for name, n in by_type.most_common()
        },
        "tokenizer": {
            "model": _string(gguf, "tokenizer.ggml.model"),
            "pre": _string(gguf, "tokenizer.ggml.pre"),
            "vocab_size": len(tokens) if isinstance(tokens := gguf.metadata.get(TOKENS_KEY), list) else None,
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
    """Hyper-parameters and a memory estimate, when the file holds a model we can build;
    None for a file without tensors (a vocabulary-only file)."""
    if not gguf.tensors:
        return None, None
    tokens = gguf.metadata.get(TOKENS_KEY)
    try:
        config = checked_config(gguf)
        if isinstance(tokens, list):
            check_vocabulary(len(tokens), config, gguf.path)
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
        "tied_embeddings": OUTPUT not in gguf.tensors,
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


def _string(gguf: GGUFFile, key: str) -> str | None:
    """The metadata string under ``key``; None when absent or not a string."""
    value = gguf.metadata.get(key)
    return value if isinstance(value, str) else None


def _short(value: Any) -> Any:
    """Metadata for display: long arrays (vocabularies) are summarised, not dumped."""
    if isinstance(value, list) and len(value) > _LARGE_ARRAY:
        return {"array_length": len(value), "head": value[:4]}
    if isinstance(value, str) and len(value) > 200:
        return value[:200] + f"... ({len(value)} chars)"
    return value
