"""Helpers of the engine acceptance tests: the tiny random-weight llama and step recording.

The model is untied on purpose: with random weights and a tied head the logit of the input
token (``e . e``) dominates, so greedy decoding repeats one token forever and batching bugs
would go unnoticed. The untied head gives diverse greedy tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rocmforge import LLM
from rocmforge.engine.scheduler import SchedulerOutput
from rocmforge.synthetic import SyntheticSpec

TINY_SPEC = SyntheticSpec(
    arch="llama",
    vocab_size=320,
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    max_context=512,
    tie_embeddings=False,
)


@dataclass(frozen=True, slots=True)
class TinyModel:
    path: Path
    spec: SyntheticSpec
    weights: dict[str, np.ndarray]
    """HF-layout fp32 weights the file holds (for a transformers reference)."""


def kv_bytes(num_blocks: int, block_size: int) -> int:
    """KV-cache memory that gives the tiny model a pool of ``num_blocks`` fp32 blocks (K and
    V, all layers), plus the runner's scratch block."""
    spec = TINY_SPEC
    return (num_blocks + 1) * 2 * spec.num_layers * block_size * spec.num_kv_heads * spec.head_dim * 4


class StepRecorder:
    """Wraps ``llm.engine.runner.execute`` to record every step's schedule."""

    def __init__(self, llm: LLM) -> None:
        self.steps: list[list[tuple[str, int, int, bool]]] = []
        runner = llm.engine.runner
        execute = runner.execute

        def recording(out: SchedulerOutput):
            self.steps.append(
                [(s.request.request_id, s.start_pos, s.num_tokens, s.samples) for s in out.scheduled]
            )
            return execute(out)

        runner.execute = recording  # type: ignore[method-assign]

    @property
    def max_batch(self) -> int:
        return max((len(s) for s in self.steps), default=0)

    @property
    def num_partial_prefills(self) -> int:
        """Scheduled chunks that did not catch their request up (chunked prefill)."""
        return sum(1 for step in self.steps for (_, _, _, samples) in step if not samples)


def assert_pool_idle(llm: LLM) -> None:
    """Every KV block is free again and the pool is consistent."""
    bm = llm.engine.scheduler.block_manager
    assert not llm.engine.has_unfinished()
    assert bm.num_free_blocks == bm.num_blocks
    bm.check_invariants([])


def hf_log_softmax(model: TinyModel, token_ids: list[int]) -> torch.Tensor:
    """Reference ``[len, vocab]`` log-probabilities from HF transformers' LlamaForCausalLM
    holding the same weights (one plain full-sequence forward, fp32)."""
    import transformers

    config = transformers.LlamaConfig(**model.spec.hf_config())
    hf = transformers.LlamaForCausalLM(config).eval()
    state = {k: torch.from_numpy(v) for k, v in model.weights.items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    with torch.inference_mode():
        logits = hf(torch.tensor([token_ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)
