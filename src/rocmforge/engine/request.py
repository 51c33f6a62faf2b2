"""One request (generation or embedding) and its token bookkeeping.

Flows in from the engine (which tokenizes the prompt, fills ``eos_token_ids`` from the
tokenizer and compiles ``grammar``); the :class:`~rocmforge.engine.scheduler.Scheduler` owns the request's state
from ``add_request`` on, the :class:`~rocmforge.engine.block_manager.BlockManager` writes
its block table (``block_ids``) and block hashes, the model runner only reads it.

One rule covers prefill, chunked prefill, prefix-cache hits and recompute after
preemption: each step a request computes ``all_token_ids[num_computed_tokens :
num_computed_tokens + n]`` ("catch computed up to total")::

    all_token_ids   [ p0 p1 p2 p3 p4 p5 | o0 o1 o2 ]      num_tokens = 9
                      \\_____ K/V in the cache _____/ \\__/
                       num_computed_tokens = 8       the next step computes o2, then samples

Two kinds, told apart by the type of ``params``: a generation request
(:class:`~rocmforge.sampling_params.SamplingParams`) samples a token each time it is caught
up; an embedding request (:class:`~rocmforge.pooling_params.PoolingParams`) has no output
tokens: the step that catches it up with its prompt pools the prompt's hidden states instead
(the model runner), and it finishes there (``stop``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

from rocmforge.pooling_params import PoolingParams
from rocmforge.sampling_params import SamplingParams
from rocmforge.structured.matcher import GrammarMatcher


class RequestState(str, Enum):
    """Where a request is in its life."""

    QUEUED = "queued"
    """In the waiting queue (new, or preempted and waiting to recompute)."""
    PREFILL = "prefill"
    """Running, catching up on its prompt (or on prompt + output after a preemption)."""
    DECODE = "decode"
    """Running, one new token per step."""
    FINISHED = "finished"


class FinishReason(str, Enum):
    """Why a request finished (the OpenAI ``finish_reason`` values plus two of ours)."""

    STOP = "stop"
    """An end-of-sequence token, a stop token id or a stop string; an embedding request's
    pooled vector."""
    LENGTH = "length"
    """``max_tokens`` were generated."""
    CANCELLED = "cancelled"
    """The client went away or cancelled."""
    ERROR = "error"
    """The request failed; ``Request.error`` says why."""


@dataclass(slots=True, eq=False)
class Request:
    """A request's tokens, progress, KV block table and timestamps (integers only).

    ``all_token_ids`` is kept as one list that :meth:`append_token` extends, so reading it
    is free; do not append to ``output_token_ids`` directly.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams | PoolingParams
    """A generation request's sampling parameters, or an embedding request's pooling ones."""
    eos_token_ids: frozenset[int] = frozenset()
    """The model's end-of-sequence ids (the engine fills them from the tokenizer)."""
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    """Generated tokens, stop / end-of-sequence token included."""
    num_computed_tokens: int = 0
    """Tokens whose K/V are in the cache (a prefix of ``all_token_ids``)."""
    num_cached_tokens: int = 0
    """Of the tokens at the last admission, how many the prefix cache served."""
    block_ids: list[int] = field(default_factory=list)
    """The block table: KV block ``block_ids[i]`` holds tokens ``[i*B, (i+1)*B)``."""
    state: RequestState = RequestState.QUEUED
    finish_reason: FinishReason | None = None
    error: str | None = None
    """Why the request failed, when ``finish_reason`` is ``ERROR``."""
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    """``time.monotonic()`` when first scheduled; ``None`` until then."""
    first_token_time: float | None = None
    """``time.monotonic()`` when the first output token was sampled."""
    finished_time: float | None = None
    """``time.monotonic()`` when it finished."""
    block_hashes: list[int] = field(default_factory=list, repr=False)
    """Chained hashes of the request's full blocks of tokens, filled lazily by the block
    manager. Tokens are only ever appended, so entries never go stale."""
    grammar: GrammarMatcher | None = field(default=None, repr=False)
    """The structured-output state (``params.structured``): the engine makes it and advances
    it with each sampled token; the model runner reads it to mask the logits."""
    _all_token_ids: list[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.prompt_token_ids = list(self.prompt_token_ids)
        self.output_token_ids = list(self.output_token_ids)
        self.eos_token_ids = frozenset(self.eos_token_ids)
        self._all_token_ids = self.prompt_token_ids + self.output_token_ids

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt followed by output, as one list (not a copy: do not mutate)."""
        return self._all_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self._all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_pooling(self) -> bool:
        """An embedding request: pooled, never sampled."""
        return isinstance(self.params, PoolingParams)

    @property
    def max_tokens(self) -> int:
        """Most output tokens it may generate (0: an embedding request)."""
        return self.params.max_tokens if isinstance(self.params, SamplingParams) else 0

    @property
    def takes_prefix_hits(self) -> bool:
        """Whether cached prefix blocks may stand in for computing its first tokens: not when
        every prompt position's output is needed (prompt logprobs; ``mean`` / ``cls``
        pooling, :attr:`PoolingParams.needs_every_token`)."""
        if isinstance(self.params, PoolingParams):
            return not self.params.needs_every_token
        return self.params.prompt_logprobs is None

    @property
    def is_finished(self) -> bool:
        return self.state is RequestState.FINISHED

    def append_token(self, token_id: int) -> None:
        """Add one sampled token to the output (its K/V are computed next step)."""
        self.output_token_ids.append(token_id)
        self._all_token_ids.append(token_id)
