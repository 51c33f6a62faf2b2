"""rocmforge: an LLM inference engine and server for GGUF models.

The public names are imported lazily so that ``import rocmforge`` (and the CLI's ``--help``)
does not pay for importing torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "rocmforge.llm",
    "SamplingParams": "rocmforge.sampling_params",
    "PoolingParams": "rocmforge.pooling_params",
    "EmbeddingOutput": "rocmforge.outputs",
    "Completion": "rocmforge.outputs",
    "RequestOutput": "rocmforge.outputs",
    "TokenLogprobs": "rocmforge.outputs",
}

__all__ = ["LLM", "Completion", "EmbeddingOutput", "PoolingParams", "RequestOutput", "SamplingParams", "TokenLogprobs",
           "__version__"]

if TYPE_CHECKING:
    from rocmforge.llm import LLM
    from rocmforge.outputs import Completion, EmbeddingOutput, RequestOutput, TokenLogprobs
    from rocmforge.pooling_params import PoolingParams
    from rocmforge.sampling_params import SamplingParams


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'rocmforge' has no attribute {name!r}")
