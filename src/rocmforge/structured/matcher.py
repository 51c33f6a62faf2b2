"""A request's grammar state, and the batch's token masks.

:class:`GrammarMatcher` is one request's position in its grammar: the engine advances it with
each sampled token (:meth:`GrammarMatcher.accept`) and finishes the request when the grammar
is complete (:attr:`GrammarMatcher.is_finished`) or broken (:attr:`GrammarMatcher.error`).

:class:`MaskFiller` is the model runner's: at the start of a step it computes, on a thread of
its own, the allowed-token bitmask of every constrained row (llguidance's executor, which
works without the GIL), while the model's forward pass runs; the sampler waits for it only
when it needs the mask. Bitmask layout (llguidance's and xgrammar's): row ``r``, token ``t``
is allowed when bit ``t % 32`` of int32 word ``t // 32`` is set; unconstrained rows are all
ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import llguidance
import torch


class GrammarMatcher:
    """One request's grammar state (module docstring)."""

    __slots__ = ("_matcher", "mask_words")

    def __init__(self, matcher: llguidance.LLMatcher, mask_words: int) -> None:
        self._matcher = matcher
        self.mask_words = mask_words
        """32-bit words of this matcher's bitmask row."""

    def accept(self, token_id: int) -> bool:
        """Advance past one sampled token; False (and :attr:`error` set) if the grammar does
        not allow it."""
        matcher = self._matcher
        # a broken matcher consumes an end-of-sequence token without complaint: check first
        return not matcher.is_error() and bool(matcher.consume_token(token_id)) and not matcher.is_error()

    def allows(self, token_id: int) -> bool:
        """Whether ``token_id`` may come next (one token; the slow check the tests compare
        bitmasks against)."""
        return bool(self._matcher.validate_tokens([token_id]) == 1)

    @property
    def is_finished(self) -> bool:
        """The output is complete: the grammar accepts nothing more (end-of-sequence aside)."""
        return bool(self._matcher.is_stopped()) and not self._matcher.is_error()

    @property
    def error(self) -> str | None:
        """Why the matcher broke (a token it refused, a grammar over its limits), or None."""
        if not self._matcher.is_error():
            return None
        return self._matcher.get_error() or "the grammar matcher failed"

    @property
    def llmatcher(self) -> llguidance.LLMatcher:
        return self._matcher


class MaskFiller:
    """Computes a step's bitmask off the calling thread (module docstring)."""

    def __init__(self) -> None:
        self._thread: ThreadPoolExecutor | None = None
        self._executor: llguidance.LLExecutor | None = None

    def start(self, matchers: Sequence[GrammarMatcher | None]) -> Future[torch.Tensor] | None:
        """Begin the bitmask ``[len(matchers), words]`` (int32, CPU) of these rows; None when
        no row is constrained. The matchers must not advance until the future is done."""
        constrained = [(m, row) for row, m in enumerate(matchers) if m is not None]
        if not constrained:
            return None
        if self._thread is None or self._executor is None:
            self._executor = llguidance.LLExecutor()
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="rocmforge-grammar")
        words = constrained[0][0].mask_words
        bitmask = torch.full((len(matchers), words), -1, dtype=torch.int32)
        return self._thread.submit(_fill, self._executor, [(m.llmatcher, row) for m, row in constrained], bitmask)


def _fill(executor: llguidance.LLExecutor, rows: list[tuple[llguidance.LLMatcher, int]],
          bitmask: torch.Tensor) -> torch.Tensor:
    executor.unsafe_compute_mask_ptr(rows, bitmask.data_ptr(), bitmask.shape[1] * 4, bitmask.shape[0])
    return bitmask


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """``logits`` ``[B, V]`` with every token the bitmask ``[B, words]`` disallows at -inf."""
    vocab = logits.shape[-1]
    words = bitmask.to(logits.device, non_blocking=True)
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((words[:, :, None] >> shifts) & 1).bool().reshape(words.shape[0], -1)[:, :vocab]
    return logits.masked_fill(~allowed, float("-inf"))


def apply_bitmask_reference(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """:func:`apply_bitmask` one token at a time, in Python (the tests' reference)."""
    out = logits.clone()
    for row in range(logits.shape[0]):
        for token in range(logits.shape[1]):
            word = int(bitmask[row, token // 32]) & 0xFFFFFFFF
            if not (word >> (token % 32)) & 1:
                out[row, token] = float("-inf")
    return out
