"""Per-request sampling parameters: validated on construction, immutable afterwards.

Flows in from the Python API (``LLM.generate``) and from the HTTP server's request models;
flows out to the scheduler (``max_tokens``, ``min_tokens``, stop ids, ``ignore_eos``), the
sampler (everything numeric), the detokenizer (``stop`` strings) and the grammar compiler
(``structured``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from rocmforge.errors import InvalidRequestError
from rocmforge.structured.spec import StructuredOutput

MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 1024
"""Most ``logit_bias`` entries one request may carry."""
MAX_TOP_K = 2**31 - 1
"""``top_k`` beyond any vocabulary; the bound keeps it inside the sampler's integer types."""


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick each next token and when to stop.

    ``temperature == 0`` is greedy decoding (the other sampling knobs are then ignored,
    penalties still apply). ``top_k <= 0`` and ``top_p == 1`` and ``min_p == 0`` disable
    those filters.
    """

    max_tokens: int = 16
    """Most tokens to generate; the request finishes with ``length`` when it reaches them."""
    min_tokens: int = 0
    """Stop tokens and stop strings are ignored until this many tokens were generated."""
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    """> 1 discourages every token already in the prompt or output (CTRL-style, as HF/vLLM)."""
    presence_penalty: float = 0.0
    """Subtracted once from the logit of every token already generated (OpenAI semantics)."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per time it was already generated."""
    seed: int | None = None
    """Makes this request's sampling reproducible regardless of what it is batched with."""
    stop: tuple[str, ...] = field(default_factory=tuple)
    """Strings that end generation; they are not part of the returned text."""
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    """Extra token ids that end generation, besides the model's end-of-sequence tokens."""
    ignore_eos: bool = False
    logprobs: int | None = None
    """Return the log-probability of each generated token and this many top alternatives."""
    prompt_logprobs: int | None = None
    """Also return, for every prompt token after the first, its log-probability given the
    tokens before it and this many top alternatives (disables prefix-cache hits)."""
    skip_special_tokens: bool = True
    keep_special_token_ids: tuple[int, ...] = field(default_factory=tuple)
    """Control tokens whose text stays in the output although ``skip_special_tokens`` skips
    the others (a tool-call format's markers, such as Mistral's ``[TOOL_CALLS]``)."""
    logit_bias: tuple[tuple[int, float], ...] = field(default_factory=tuple)
    """``(token id, bias)`` pairs added to the logits before any sampling step (OpenAI's
    ``logit_bias``: -100 all but bans a token, +100 all but forces it); a ``{id: bias}`` dict
    is accepted too. Log-probabilities stay those of the model's distribution."""
    structured: StructuredOutput | None = None
    """Constrain the output to a JSON schema, a regex, a choice or a grammar: every sampled
    token is one the constraint allows, and the request finishes (``stop``) as soon as the
    output is complete. ``min_tokens`` does not hold such a request back; logprobs stay those
    of the model's unconstrained distribution."""

    def __post_init__(self) -> None:
        # Lists are accepted for convenience and frozen into tuples.
        object.__setattr__(self, "logit_bias", _as_bias(self.logit_bias))
        object.__setattr__(self, "stop", _as_tuple(self.stop, str, "stop"))
        object.__setattr__(self, "stop_token_ids", _as_tuple(self.stop_token_ids, int, "stop_token_ids"))
        object.__setattr__(self, "keep_special_token_ids",
                           _as_tuple(self.keep_special_token_ids, int, "keep_special_token_ids"))
        if self.structured is not None and not isinstance(self.structured, StructuredOutput):
            raise InvalidRequestError("structured must be a StructuredOutput", param="structured")
        _check_int(self.max_tokens, "max_tokens", low=1)
        _check_int(self.min_tokens, "min_tokens", low=0)
        if self.min_tokens > self.max_tokens:
            raise InvalidRequestError("min_tokens must not exceed max_tokens", param="min_tokens")
        _check_float(self.temperature, "temperature", low=0.0, high=100.0)
        _check_int(self.top_k, "top_k", low=-1, high=MAX_TOP_K)
        _check_float(self.top_p, "top_p", low=0.0, high=1.0, low_open=True)
        _check_float(self.min_p, "min_p", low=0.0, high=1.0)
        _check_float(self.repetition_penalty, "repetition_penalty", low=0.0, high=100.0, low_open=True)
        _check_float(self.presence_penalty, "presence_penalty", low=-2.0, high=2.0)
        _check_float(self.frequency_penalty, "frequency_penalty", low=-2.0, high=2.0)
        if self.seed is not None:
            _check_int(self.seed, "seed", low=0, high=2**63 - 1)
        if self.logprobs is not None:
            _check_int(self.logprobs, "logprobs", low=0, high=MAX_LOGPROBS)
        if self.prompt_logprobs is not None:
            _check_int(self.prompt_logprobs, "prompt_logprobs", low=0, high=MAX_LOGPROBS)
        if any(not s for s in self.stop):
            raise InvalidRequestError("stop strings must not be empty", param="stop")
        if any(t < 0 for t in self.stop_token_ids):
            raise InvalidRequestError("stop_token_ids must be non-negative", param="stop_token_ids")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _as_bias(value: object) -> tuple[tuple[int, float], ...]:
    items = list(value.items()) if isinstance(value, dict) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(i, (list, tuple)) and len(i) == 2 for i in items):
        raise InvalidRequestError("logit_bias must map token ids to numbers", param="logit_bias")
    if len(items) > MAX_LOGIT_BIAS:
        raise InvalidRequestError(f"logit_bias has {len(items)} entries; at most {MAX_LOGIT_BIAS}", param="logit_bias")
    for token, bias in items:
        _check_int(token, "logit_bias", low=0)
        _check_float(bias, "logit_bias", low=-100.0, high=100.0)
    if len({token for token, _ in items}) != len(items):
        raise InvalidRequestError("logit_bias names a token id twice", param="logit_bias")
    return tuple(sorted((token, float(bias)) for token, bias in items))


def _as_tuple(value: object, kind: type, name: str) -> tuple:
    if isinstance(value, (str, int)):
        value = (value,)
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(v, kind) and not isinstance(v, bool) for v in value
    ):
        raise InvalidRequestError(f"{name} must be a list of {kind.__name__}", param=name)
    return tuple(value)


def _check_int(value: object, name: str, *, low: int, high: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidRequestError(f"{name} must be an integer", param=name)
    if value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise InvalidRequestError(f"{name} must be {bounds}, got {value}", param=name)


def _check_float(
    value: object, name: str, *, low: float, high: float, low_open: bool = False
) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise InvalidRequestError(f"{name} must be a number", param=name)
    if not math.isfinite(value):
        raise InvalidRequestError(f"{name} must be finite", param=name)
    too_low = value <= low if low_open else value < low
    if too_low or value > high:
        interval = f"{'(' if low_open else '['}{low}, {high}]"
        raise InvalidRequestError(f"{name} must be in {interval}, got {value}", param=name)
