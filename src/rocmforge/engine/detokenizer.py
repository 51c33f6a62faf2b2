"""Incremental detokenization for streaming, with stop strings.

In: generated token ids, one at a time. Out: text deltas whose concatenation is exactly the
final text. Text is the UTF-8 decoding of the concatenated token bytes, so a character split
across tokens is emitted only once complete, and never broken. Stop strings end the text
before the stop string; to never leak a stop string's beginning into the stream, the last
``max(len(stop)) - 1`` characters are held back until they cannot start a stop string.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass

from rocmforge.sampling_params import SamplingParams
from rocmforge.tokenizer import Tokenizer


@dataclass(slots=True)
class DetokenizerUpdate:
    delta: str
    """New text, safe to show (possibly empty)."""
    stop: str | None = None
    """The stop string that ended generation, if one matched."""


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, params: SamplingParams) -> None:
        self._tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = params.stop
        self._hold = max((len(s) for s in params.stop), default=1) - 1
        self._min_tokens = params.min_tokens
        self._skip_special = params.skip_special_tokens
        self._kept = frozenset(params.keep_special_token_ids)
        self._num_tokens = 0
        self._emitted = 0
        self._stopped = False
        self.text = ""

    def add(self, token_id: int) -> DetokenizerUpdate:
        self._num_tokens += 1
        if self._skip_special and token_id not in self._kept and self._tokenizer.is_special(token_id):
            piece = b""
        else:
            piece = self._tokenizer.token_bytes(token_id)
        before = len(self.text)
        self.text += self._decoder.decode(piece)
        # Like stop tokens (Scheduler._stop_reason): the min_tokens-th token may end it.
        if self._stops and self._num_tokens >= self._min_tokens:
            # Only a stop string that ends in the new text can be new.
            window = max(0, before - self._hold)
            hits = [(i, s) for s in self._stops if (i := self.text.find(s, window)) >= 0]
            if hits:
                index, stop = min(hits)
                self.text = self.text[:index]
                self._stopped = True
                return DetokenizerUpdate(self._take(len(self.text)), stop)
        return DetokenizerUpdate(self._take(len(self.text) - self._hold))

    def finish(self) -> str:
        """Flush: the held-back tail (and a replacement char for a dangling partial UTF-8)."""
        if not self._stopped:
            self.text += self._decoder.decode(b"", final=True)
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        if end <= self._emitted:
            return ""
        delta = self.text[self._emitted : end]
        self._emitted = end
        return delta
