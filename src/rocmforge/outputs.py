"""What the engine hands back: per-step request outputs, the final completions and embeddings.

These are the public result types of the Python API (``rocmforge.LLM``) and what the
server serialises.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """The log-probability of one token and the best alternatives at its position."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]
    """(token id, logprob) pairs, best first."""


@dataclass(slots=True)
class RequestOutput:
    """One request's progress after an engine step (streaming unit)."""

    request_id: str
    new_token_ids: list[int]
    delta_text: str
    text: str
    """All text so far (stop strings removed)."""
    finished: bool
    finish_reason: str | None = None
    """``stop`` | ``length`` | ``cancelled`` | ``error`` once finished."""
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    """Prompt tokens whose KV came from the prefix cache rather than being computed."""
    new_logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs] | None = None
    """Set on a request's first output when it asked for prompt logprobs."""
    stop_reason: str | int | None = None
    """On the final output: the stop string or stop token id that ended generation."""
    error: str | None = None
    embedding: list[float] | None = None
    """On an embedding request's final output (``stop``): its pooled vector."""


@dataclass(slots=True)
class Completion:
    """The finished result of one prompt."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[TokenLogprobs] | None = None
    prompt_logprobs: list[TokenLogprobs] | None = None
    stop_reason: str | int | None = None
    """The stop string or stop token id that ended generation, if any."""
    num_cached_tokens: int = 0
    """Prompt tokens served from the prefix cache (OpenAI's ``cached_tokens``)."""


@dataclass(slots=True)
class EmbeddingOutput:
    """The embedding of one prompt: its pooled final hidden states (fp32 values), truncated to
    ``dimensions`` and L2-normalised unless the request said otherwise."""

    request_id: str
    prompt_token_ids: list[int]
    embedding: list[float]
    num_cached_tokens: int = 0
    """Prompt tokens served from the prefix cache (``last`` pooling only)."""

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)
