"""The architectures rocmforge can run, as data.

Each GGUF ``general.architecture`` value maps to an :class:`ArchSpec` that says how that
architecture differs from the llama baseline. Nothing else in the package branches on the
architecture name: the loader and the model read these fields.

Differences covered today:

* ``rope_interleaved`` — llama.cpp's converter (``convert_hf_to_gguf.py``,
  ``LlamaModel.permute``) reorders the rows of ``attn_q``/``attn_k`` from HF's rotate-half
  layout into the interleaved-pairs layout of ggml's "normal" RoPE. Architectures llama.cpp
  runs with NEOX RoPE (qwen2) keep HF's rotate-half rows. The model uses interleaved RoPE
  (a complex multiply per pair, the fewest ops); the loader permutes rotate-half Q/K rows
  into that layout. Attention is unchanged: Q and K get the same permutation of the head
  dimension, which leaves every dot product as it was.
* ``qkv_bias`` — qwen2 has biases on the Q, K and V projections.
"""

from __future__ import annotations

from dataclasses import dataclass

from rocmforge.errors import UnsupportedArchitectureError


@dataclass(frozen=True, slots=True)
class ArchSpec:
    name: str
    rope_interleaved: bool
    qkv_bias: bool
    default_rope_theta: float = 10000.0


ARCHITECTURES: dict[str, ArchSpec] = {
    spec.name: spec
    for spec in (
        # SmolLM and SmolLM2 are stored as "llama".
        ArchSpec("llama", rope_interleaved=True, qkv_bias=False),
        ArchSpec("mistral", rope_interleaved=True, qkv_bias=False),
        ArchSpec("qwen2", rope_interleaved=False, qkv_bias=True, default_rope_theta=1_000_000.0),
    )
}


def get_arch(name: str) -> ArchSpec:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedArchitectureError(
            f"architecture {name!r} is not supported (supported: {supported})"
        ) from None
