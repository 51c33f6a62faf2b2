"""Random-weight GGUF files of llama-family models, for tests and benchmarks.

In: a :class:`SyntheticSpec` (architecture and sizes), a seed and a tensor-type choice.
Out: a GGUF file laid out exactly as llama.cpp's converter writes one. Three modules, one
concept each; every public name is re-exported here, so ``from rocmforge.synthetic import X``
is the way to use them:

* :mod:`~rocmforge.synthetic.spec` -- what a file holds apart from tensor data: the spec and
  its presets (:data:`LLAMA_3_2_1B`, :data:`LLAMA_3_1_8B`), metadata, vocabulary and chat
  template, tensor names and shapes, llama-3 RoPE factors, the tensor-type chooser contract;
* :mod:`~rocmforge.synthetic.hf_weights` -- small files whose weights an HF transformers model
  can load too (:func:`random_hf_weights`, :func:`write_gguf`, :func:`encode_weight`);
* :mod:`~rocmforge.synthetic.random_weights` -- big files of real-model sizes for benchmarks,
  generated straight in their stored encoding in bounded memory (:func:`write_random_gguf`,
  :func:`q4_k_m_types`, :data:`RANDOM_TYPES`).
"""

from __future__ import annotations

from rocmforge.synthetic.hf_weights import encode_weight, random_hf_weights, write_gguf
from rocmforge.synthetic.random_weights import (
    RANDOM_TYPES,
    q4_k_m_types,
    write_random_gguf,
)
from rocmforge.synthetic.spec import (
    CHATML_TEMPLATE,
    LLAMA_3_1_8B,
    LLAMA_3_2_1B,
    SPECIAL_TOKENS,
    SyntheticSpec,
    TensorTypeChooser,
    all_f32,
    llama3_rope_factors,
    tensor_names,
)

__all__ = [
    "CHATML_TEMPLATE",
    "LLAMA_3_1_8B",
    "LLAMA_3_2_1B",
    "RANDOM_TYPES",
    "SPECIAL_TOKENS",
    "SyntheticSpec",
    "TensorTypeChooser",
    "all_f32",
    "encode_weight",
    "llama3_rope_factors",
    "q4_k_m_types",
    "random_hf_weights",
    "tensor_names",
    "write_gguf",
    "write_random_gguf",
]
