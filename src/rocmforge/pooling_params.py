"""Per-request pooling parameters: what an embedding request asks for instead of sampling.

Flows in from the Python API (``LLM.embed``) and the server's ``/v1/embeddings``; flows out
to the scheduler (``pooling``: whether prefix-cache hits may be used) and the model runner
(which pools, truncates and normalises the final hidden states).

Why a class of its own rather than more fields of
:class:`~rocmforge.sampling_params.SamplingParams` (vLLM's choice too): none of the sampling
knobs (temperature, penalties, stop strings, ``max_tokens``, logprobs, constraints) means
anything to a request that never samples, and none of these means anything to generation.
A :class:`~rocmforge.engine.request.Request` carries one or the other, so the request's kind
is its parameters' type, which every reader has to check (mypy sees to it).

Pooling is over the final hidden states (after the final norm, before the LM head), the
``{arch}.pooling_type`` kinds of llama.cpp: ``mean`` (all prompt tokens), ``cls`` (the first
token), ``last`` (the last prompt token).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, get_args

from rocmforge.errors import InvalidRequestError

PoolingType = Literal["mean", "cls", "last"]
POOLING_TYPES: tuple[PoolingType, ...] = get_args(PoolingType)

GGUF_POOLING_TYPES: Mapping[int, str] = {0: "none", 1: "mean", 2: "cls", 3: "last", 4: "rank"}
"""llama.cpp's ``enum llama_pooling_type`` as stored in ``{arch}.pooling_type``."""


@dataclass(frozen=True, slots=True)
class PoolingParams:
    """How to turn a prompt's final hidden states into one embedding vector."""

    pooling: PoolingType | None = None
    """``mean`` | ``cls`` | ``last``; None: the engine's (its ``pooling`` setting, by default
    the model file's ``pooling_type``)."""
    dimensions: int | None = None
    """Keep only the first N dimensions (Matryoshka truncation), before normalising; at most
    the model's hidden size (the engine checks). None: all of them."""
    normalize: bool = True
    """Scale the vector to unit L2 norm (after truncation)."""

    def __post_init__(self) -> None:
        if self.pooling is not None and self.pooling not in POOLING_TYPES:
            raise InvalidRequestError(f"pooling must be one of {', '.join(POOLING_TYPES)}, got {self.pooling!r}",
                                      param="pooling")
        if self.dimensions is not None and (
                not isinstance(self.dimensions, int) or isinstance(self.dimensions, bool) or self.dimensions < 1):
            raise InvalidRequestError(f"dimensions must be an integer >= 1, got {self.dimensions!r}",
                                      param="dimensions")
        if not isinstance(self.normalize, bool):
            raise InvalidRequestError("normalize must be true or false", param="normalize")

    @property
    def needs_every_token(self) -> bool:
        """The pooled vector reads hidden states of tokens other than the last (``mean``,
        ``cls``): every prompt token must be computed, so such a request takes no prefix-cache
        hits (a hit's K/V are cached, its hidden states are not). ``last`` reads only the last
        prompt token's, which the scheduler always computes (hits stop short of it), and the
        cached K/V it attends to are the ones a full computation would produce: it may use
        hits."""
        return self.pooling != "last"


def resolve_pooling(setting: str, file_pooling: str | None) -> tuple[PoolingType | None, str | None]:
    """The pooling an engine embeds with, from its ``pooling`` setting (``auto`` | a
    :data:`PoolingType`) and the model file's ``pooling_type`` name (None: the key is absent).
    Returns ``(pooling, None)``, or ``(None, why)`` when there is none to embed with."""
    by_name: dict[str | None, PoolingType] = {name: name for name in POOLING_TYPES}
    if setting != "auto":
        if setting not in by_name:
            raise ValueError(f"unknown pooling setting {setting!r}")
        return by_name[setting], None
    if file_pooling in by_name:
        return by_name[file_pooling], None
    if file_pooling == "rank":
        why = "the model file's pooling_type is rank (a reranker's classification head), which rocmforge cannot run"
    elif file_pooling == "none":
        why = "the model file's pooling_type is none (a generation model)"
    else:
        why = "the model file declares no pooling_type (a generation model)"
    return None, why
