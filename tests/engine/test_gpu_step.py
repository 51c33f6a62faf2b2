"""A served decode step on a GPU: replayed from a CUDA graph, with one host synchronisation.

Skipped without a GPU (the CPU runs the same padded step eagerly: test_static_decode.py).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny_engine import TinyModel

from rocmforge import LLM, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA/ROCm GPU")]


def test_decode_steps_replay_graphs_and_synchronise_once(tiny_model: TinyModel) -> None:
    llm = LLM(tiny_model.path, device="cuda", max_num_seqs=8)
    engine = llm.engine
    graphs = engine.runner.decode_graphs
    assert graphs is not None and graphs.use_graphs
    for i in range(3):
        engine.add_request(f"r{i}", [5 + i, 6, 7], SamplingParams(max_tokens=6, temperature=0.8, seed=i))
    engine.step()  # prefill (eager)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            engine.step()  # a decode step of 3 requests, padded to the graph of 4
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]
