"""Encoding a long prompt in a worker thread leaves the other threads running (the GIL is free).

The server encodes in a worker thread so its event loop stays responsive; that only works
if the backend releases the GIL while it works.  ``Tokenizer.encode`` used to hold it for
the whole call (a ticker thread saw a 680 ms gap for a 0.9 MB prompt).
"""

from __future__ import annotations

import random
import threading
import time

import pytest
from synthetic_vocabs import byte_level_metadata

from rocmforge.tokenizer import Tokenizer

MAX_GAP_S = 0.25
"""Longest pause a 1 ms ticker may see (generous: a busy 2-core machine; the old code paused
for the whole encode, ~0.7 s and more)."""


def _long_text(size: int = 1 << 20) -> str:
    rng = random.Random(0)
    words = ["hello", "world", "the", "quick", "fox", "über", "naïve", "12345", "\n", "GPU"]
    parts: list[str] = []
    length = 0
    while length < size:
        word = rng.choice(words)
        parts.append(word)
        length += len(word) + 1
    return " ".join(parts)[:size]


def _longest_pause_while(work: threading.Thread) -> float:
    """Run ``work`` while a ticker thread (started first) sleeps 1 ms at a time; return the
    longest gap between its ticks."""
    gaps: list[float] = []
    done = threading.Event()
    ticking = threading.Event()

    def tick() -> None:
        last = time.perf_counter()
        while not done.is_set():
            time.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
            ticking.set()

    ticker = threading.Thread(target=tick)
    ticker.start()
    ticking.wait()
    work.start()
    work.join()
    done.set()
    ticker.join()
    return max(gaps)


@pytest.mark.parametrize("parse_special", [True, False])
def test_encoding_releases_the_gil(parse_special: bool) -> None:
    tokenizer = Tokenizer.from_gguf_metadata(
        byte_level_metadata(["h e", "l l", "o Ġ", "Ġ t", "t h", "th e", "e Ġ"])
    )
    text = _long_text()
    result: list[list[int]] = []
    work = threading.Thread(
        target=lambda: result.append(tokenizer.encode(text, parse_special=parse_special))
    )
    start = time.perf_counter()
    pause = _longest_pause_while(work)
    elapsed = time.perf_counter() - start
    assert result and tokenizer.decode(result[0]) == text
    assert pause < MAX_GAP_S, f"a {pause * 1e3:.0f} ms pause during a {elapsed * 1e3:.0f} ms encode"
