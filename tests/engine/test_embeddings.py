"""Embedding requests through the engine, against HF transformers on the tiny random llama.

The oracle: ``transformers.LlamaModel`` holding the weights the GGUF file holds, in fp64, one
plain full-sequence forward; its ``last_hidden_state`` (after the final norm) pooled the same
way (mean over the prompt, the first token, the last token) and L2-normalised. Ours runs
through the scheduler, the paged KV cache and chunked prefill, batched with other requests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_engine import TINY_SPEC, StepRecorder, TinyModel, assert_pool_idle, kv_bytes

from rocmforge import LLM, PoolingParams, SamplingParams
from rocmforge.attention import get_backend
from rocmforge.config import CacheConfig, PoolerConfig, SchedulerConfig
from rocmforge.engine.llm_engine import LLMEngine
from rocmforge.engine.model_runner import ModelRunner
from rocmforge.engine.scheduler import Scheduler
from rocmforge.errors import ConfigError, ContextLengthExceededError, EmbeddingsUnsupportedError, InvalidRequestError
from rocmforge.gguf import read_gguf
from rocmforge.models.loader import load_model
from rocmforge.outputs import RequestOutput
from rocmforge.synthetic import random_hf_weights, write_gguf
from rocmforge.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

CHUNK = 16
"""max_num_batched_tokens: prompts longer than this are prefilled in chunks."""
LONG = [(7 * i + 3) % TINY_SPEC.vocab_size for i in range(70)]
SHORT = [11, 42, 97, 5, 230]
POOLINGS = ("mean", "cls", "last")
ATOL = 1e-5


@pytest.fixture(scope="module")
def hf_model(tiny_model: TinyModel):
    config = transformers.LlamaConfig(**tiny_model.spec.hf_config())
    model = transformers.LlamaModel(config).double().eval()
    state = {k.removeprefix("model."): torch.from_numpy(v).double() for k, v in tiny_model.weights.items()
             if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return model


def reference(hf_model, ids: list[int], pooling: str, *, dimensions: int | None = None,
              normalize: bool = True) -> np.ndarray:
    """HF's final hidden states of ``ids``, pooled, truncated and normalised."""
    with torch.inference_mode():
        hidden = hf_model(torch.tensor([ids])).last_hidden_state[0]
    vector = {"mean": hidden.mean(dim=0), "cls": hidden[0], "last": hidden[-1]}[pooling]
    if dimensions is not None:
        vector = vector[:dimensions]
    if normalize:
        vector = vector / vector.norm()
    return vector.numpy()


def make(make_llm: Callable[..., LLM], **kw) -> LLM:
    return make_llm(max_num_batched_tokens=CHUNK, max_num_seqs=4, block_size=4, **kw)


@pytest.mark.parametrize("pooling", POOLINGS)
def test_pooled_embeddings_match_transformers_through_chunked_prefill(make_llm, hf_model, pooling: str) -> None:
    llm = make(make_llm, pooling=pooling, enable_prefix_caching=False)
    recorder = StepRecorder(llm)
    short, long = llm.embed([SHORT, LONG])
    assert recorder.num_partial_prefills >= len(LONG) // CHUNK - 1  # the long prompt ran in chunks
    for ids, result in ((SHORT, short), (LONG, long)):
        assert result.prompt_token_ids == ids and result.num_prompt_tokens == len(ids)
        np.testing.assert_allclose(result.embedding, reference(hf_model, ids, pooling), atol=ATOL, rtol=0)
    assert_pool_idle(llm)
    assert llm.engine.runner.pooler.num_pending == 0


@pytest.mark.parametrize("pooling", POOLINGS)
def test_a_cached_shared_prefix_gives_the_same_embedding(make_llm, hf_model, pooling: str) -> None:
    """``last`` takes the cached prefix blocks; ``mean`` and ``cls`` must compute every token
    and take none. Either way the vector is the reference's."""
    llm = make(make_llm, pooling=pooling)
    shared = LONG[:40]
    llm.generate([shared + [1, 2, 3]], SamplingParams(max_tokens=2, temperature=0))  # fills the prefix cache
    [result] = llm.embed([shared + SHORT])
    if pooling == "last":
        assert result.num_cached_tokens >= 36  # whole blocks of the shared prefix
    else:
        assert result.num_cached_tokens == 0
    np.testing.assert_allclose(result.embedding, reference(hf_model, shared + SHORT, pooling), atol=ATOL, rtol=0)
    # The embedding request's own blocks fill the cache for later requests too.
    [again] = llm.embed([shared + SHORT])
    np.testing.assert_allclose(again.embedding, result.embedding, atol=ATOL, rtol=0)
    assert_pool_idle(llm)


def test_dimensions_truncate_before_normalising(make_llm, hf_model) -> None:
    llm = make(make_llm, pooling="mean")
    [short] = llm.embed([SHORT], PoolingParams(dimensions=8))
    assert len(short.embedding) == 8
    np.testing.assert_allclose(short.embedding, reference(hf_model, SHORT, "mean", dimensions=8), atol=ATOL, rtol=0)
    [raw] = llm.embed([LONG], PoolingParams(normalize=False))
    assert len(raw.embedding) == TINY_SPEC.hidden_size
    np.testing.assert_allclose(raw.embedding, reference(hf_model, LONG, "mean", normalize=False), atol=ATOL, rtol=1e-5)
    assert abs(float(np.linalg.norm(raw.embedding)) - 1.0) > 1e-2  # really not normalised


def test_a_request_may_name_its_pooling(make_llm, hf_model) -> None:
    llm = make(make_llm)  # the tiny file declares no pooling_type
    [result] = llm.embed([SHORT], PoolingParams(pooling="cls"))
    np.testing.assert_allclose(result.embedding, reference(hf_model, SHORT, "cls"), atol=ATOL, rtol=0)


def _run(llm: LLM, requests: dict[str, tuple[list[int], SamplingParams | PoolingParams]]) -> dict[str, RequestOutput]:
    """Add every request, step until all finished; the final output of each."""
    engine = llm.engine
    for request_id, (ids, params) in requests.items():
        engine.add_request(request_id, ids, params)
    finals: dict[str, RequestOutput] = {}
    tokens: dict[str, list[int]] = {rid: [] for rid in requests}
    while engine.has_unfinished():
        for output in engine.step():
            tokens[output.request_id].extend(output.new_token_ids)
            if output.finished:
                finals[output.request_id] = replace(output, new_token_ids=tokens[output.request_id])
    assert set(finals) == set(requests)
    return finals


def test_embeddings_batched_with_generation_equal_them_alone(make_llm) -> None:
    llm = make(make_llm, pooling="mean", enable_prefix_caching=False)
    bm = llm.engine.scheduler.block_manager
    free_at_start = bm.num_free_blocks
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    generation = {"g0": (SHORT, greedy), "g1": (LONG[:20], greedy)}
    embedding = {"e0": (LONG, PoolingParams()), "e1": (SHORT, PoolingParams()),
                 "e2": (LONG[10:50], PoolingParams(pooling="last"))}
    alone = {rid: _run(llm, {rid: request})[rid] for rid, request in {**generation, **embedding}.items()}

    recorder = StepRecorder(llm)
    together = _run(llm, {**generation, **embedding})
    mixed = [step for step in recorder.steps if {r for r, *_ in step} & set(generation)
             and {r for r, *_ in step} & set(embedding)]
    assert mixed, recorder.steps  # embedding prefills shared steps with generation requests
    for rid in generation:
        assert together[rid].finish_reason == "length"
        assert together[rid].new_token_ids == alone[rid].new_token_ids
    for rid in embedding:
        assert together[rid].finish_reason == "stop" and together[rid].new_token_ids == []
        np.testing.assert_allclose(together[rid].embedding, alone[rid].embedding, atol=ATOL, rtol=0)
        assert together[rid].num_prompt_tokens == len(embedding[rid][0])
    assert bm.num_free_blocks == free_at_start
    assert_pool_idle(llm)
    assert llm.engine.runner.pooler.num_pending == 0


def test_a_cancelled_embedding_request_frees_its_blocks(make_llm, hf_model) -> None:
    llm = make(make_llm, pooling="mean", enable_prefix_caching=False)
    engine = llm.engine
    bm = engine.scheduler.block_manager
    engine.add_request("e", LONG, PoolingParams())
    assert engine.step() == []  # the first chunk: no output yet
    assert bm.num_free_blocks < bm.num_blocks and engine.runner.pooler.num_pending == 1
    assert engine.abort("e")
    assert_pool_idle(llm)
    assert engine.runner.pooler.num_pending == 0
    # The id is free again, and a fresh request under it pools from scratch.
    [output] = _run(llm, {"e": (LONG, PoolingParams())}).values()
    np.testing.assert_allclose(output.embedding, reference(hf_model, LONG, "mean"), atol=ATOL, rtol=0)


def test_a_preempted_embedding_request_recomputes_to_the_same_vector(make_llm, hf_model) -> None:
    """A growing generation request takes the KV blocks of the embedding request admitted
    after it, mid-prefill; the embedding is recomputed from its first token later."""
    llm = make(make_llm, pooling="mean", enable_prefix_caching=False, kv_cache_memory=kv_bytes(16, 4))
    assert llm.engine.scheduler.block_manager.num_blocks == 16
    long = LONG[:60]
    finals = _run(llm, {"g": (SHORT, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)),
                        "e": (long, PoolingParams())})
    assert llm.engine.scheduler.num_preemptions > 0
    assert finals["g"].finish_reason == "length" and finals["e"].finish_reason == "stop"
    np.testing.assert_allclose(finals["e"].embedding, reference(hf_model, long, "mean"), atol=ATOL, rtol=0)
    assert_pool_idle(llm)


def test_bad_embedding_requests_are_refused_before_queueing(make_llm) -> None:
    llm = make(make_llm, pooling="last")
    with pytest.raises(InvalidRequestError, match=r"dimensions must be in \[1, 64\]") as err:
        llm.embed([SHORT], PoolingParams(dimensions=65))
    assert err.value.param == "dimensions"
    with pytest.raises(InvalidRequestError) as err:
        PoolingParams(dimensions=0)
    assert err.value.param == "dimensions"
    with pytest.raises(InvalidRequestError) as err:
        llm.embed([[TINY_SPEC.vocab_size]])
    assert err.value.param == "prompt"
    with pytest.raises(ContextLengthExceededError):
        llm.embed([[1] * (TINY_SPEC.max_context + 1)])
    with pytest.raises(InvalidRequestError, match="empty"):
        llm.embed([[]])
    assert not llm.engine.has_unfinished()
    [fine] = llm.embed([[1] * TINY_SPEC.max_context])  # the whole context is allowed
    assert len(fine.embedding) == TINY_SPEC.hidden_size


def _model_with_pooling(tmp_path: Path, pooling_type: int | None) -> Path:
    spec = replace(TINY_SPEC, pooling_type=pooling_type)
    path = tmp_path / f"pooling-{pooling_type}.gguf"
    write_gguf(path, spec, random_hf_weights(spec, seed=11), seed=11)
    return path


def test_the_gguf_pooling_type_is_the_default_and_the_setting_overrides_it(tmp_path: Path) -> None:
    options = {"device": "cpu", "dtype": "float32", "weight_format": "dense"}
    mean_file = _model_with_pooling(tmp_path, 1)
    assert LLM(mean_file, **options).engine.pooling == "mean"
    assert LLM(mean_file, pooling="cls", **options).engine.pooling == "cls"
    assert LLM(_model_with_pooling(tmp_path, 3), **options).engine.pooling == "last"
    for pooling_type, why in ((None, "declares no pooling_type"), (0, "pooling_type is none"),
                              (4, "pooling_type is rank")):
        llm = LLM(_model_with_pooling(tmp_path, pooling_type), **options)
        assert llm.engine.pooling is None
        with pytest.raises(EmbeddingsUnsupportedError, match=why):
            llm.embed("hello")
        assert llm.generate("hello", SamplingParams(max_tokens=2))[0].token_ids  # it still generates
    with pytest.raises(ConfigError) as err:
        PoolerConfig(pooling="max")
    assert err.value.param == "pooling"


def test_one_token_embeddings_beside_static_decode_steps(tiny_model: TinyModel, hf_model) -> None:
    """A one-token embedding request caught up in a step of decodes looks like a decode row:
    the static (CUDA-graph) decode path must not take that step, whose hidden states it needs."""
    with read_gguf(tiny_model.path) as gguf:
        loaded = load_model(gguf, device=torch.device("cpu"), dtype=torch.float32, attention=get_backend("torch"),
                            weight_format="dense")
        tokenizer = Tokenizer.from_gguf_metadata(gguf.metadata)
    runner = ModelRunner(loaded.model, 32, 8, torch.device("cpu"), kv_dtype=torch.float32, static_decode=True,
                         max_num_seqs=4, max_model_len=96)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=96),
                          CacheConfig(block_size=8), 32)
    engine = LLMEngine(runner, tokenizer, scheduler, pooling="last")
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    engine.add_request("g0", SHORT, greedy)
    engine.add_request("g1", LONG[:9], greedy)
    engine.step()  # both prefilled: decodes from here on
    finals: dict[str, RequestOutput] = {}
    for rid, ids in (("e0", [42]), ("e1", [7])):
        engine.add_request(rid, ids, PoolingParams(pooling="cls" if rid == "e1" else None))
        for output in engine.step():
            if output.finished:
                finals[output.request_id] = output
    assert {"e0", "e1"} <= set(finals)
    np.testing.assert_allclose(finals["e0"].embedding, reference(hf_model, [42], "last"), atol=ATOL, rtol=0)
    np.testing.assert_allclose(finals["e1"].embedding, reference(hf_model, [7], "cls"), atol=ATOL, rtol=0)
    while engine.has_unfinished():
        engine.step()
    assert scheduler.block_manager.num_free_blocks == scheduler.block_manager.num_blocks
