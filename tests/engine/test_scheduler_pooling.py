"""The scheduler's side of embedding requests (integers only, no model): chunked like any
prefill, finished (``stop``, blocks freed) by the step that catches them up when the runner
pooled them, prefix-cache hits for ``last`` pooling only, and the KV peak of a prompt alone."""

from __future__ import annotations

import pytest

from rocmforge.config import CacheConfig, SchedulerConfig
from rocmforge.engine.request import FinishReason, Request, RequestState
from rocmforge.engine.scheduler import RunnerOutput, Scheduler, SchedulerOutput
from rocmforge.errors import ContextLengthExceededError
from rocmforge.pooling_params import PoolingParams
from rocmforge.sampling_params import SamplingParams

BLOCK = 4


def make(num_blocks: int = 32, **kw) -> Scheduler:
    kw.setdefault("max_model_len", 256)
    return Scheduler(SchedulerConfig(**kw), CacheConfig(BLOCK, True), num_blocks)


def run(sched: Scheduler, pooled: bool = True) -> tuple[SchedulerOutput, list[Request]]:
    """One step; the "runner" pools every caught-up embedding request (unless ``pooled`` is
    False) and samples token 1 for every caught-up generation request."""
    out = sched.schedule()
    done = [item for item in out.scheduled if item.samples]
    result = RunnerOutput(sampled={i.request.request_id: 1 for i in done if not i.request.is_pooling},
                          pooled={i.request.request_id: [0.5] for i in done if i.request.is_pooling and pooled})
    return out, sched.update(out, result)


def test_an_embedding_request_is_chunked_then_finished_by_its_pooled_step() -> None:
    sched = make(max_num_batched_tokens=8, max_num_seqs=2)
    embed = Request("e", list(range(20)), PoolingParams(pooling="mean"))
    sched.add_request(embed)
    plan = []
    while sched.has_unfinished():
        out, updated = run(sched)
        plan.append([(i.start_pos, i.num_tokens, i.samples) for i in out.scheduled])
        assert updated == ([embed] if out.scheduled[0].samples else [])
    assert plan == [[(0, 8, False)], [(8, 8, False)], [(16, 4, True)]]
    assert embed.state is RequestState.FINISHED and embed.finish_reason is FinishReason.STOP
    assert embed.output_token_ids == [] and embed.block_ids == []
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks


def test_no_pooled_vector_fails_the_request() -> None:
    sched = make()
    embed = Request("e", [1, 2, 3], PoolingParams(pooling="last"))
    sched.add_request(embed)
    _, updated = run(sched, pooled=False)
    assert updated == [embed] and embed.finish_reason is FinishReason.ERROR and "no embedding" in (embed.error or "")
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks


@pytest.mark.parametrize("pooling,hits", [("last", True), ("mean", False), ("cls", False)])
def test_only_last_pooling_takes_prefix_cache_hits(pooling: str, hits: bool) -> None:
    sched = make()
    prefix = list(range(12))
    sched.add_request(Request("g", prefix + [99], SamplingParams(max_tokens=1)))
    while sched.has_unfinished():
        run(sched)
    embed = Request("e", prefix + [50, 51], PoolingParams(pooling=pooling))
    sched.add_request(embed)
    out, _ = run(sched)
    assert out.scheduled[0].start_pos == (12 if hits else 0)
    assert embed.num_cached_tokens == (12 if hits else 0)
    assert embed.finish_reason is FinishReason.STOP


def test_an_embedding_prompt_may_fill_the_whole_context_and_pool() -> None:
    sched = make(num_blocks=4, max_model_len=16)  # 16 tokens of KV in all
    sched.check_length(16, 0)  # no output token: the prompt alone is the peak
    with pytest.raises(ContextLengthExceededError) as err:
        sched.check_length(17, 0, param="prompt")
    assert err.value.param == "prompt" and "max_tokens" not in err.value.message
    with pytest.raises(ContextLengthExceededError):
        sched.check_length(16, 1)  # a generation request needs room for its token
