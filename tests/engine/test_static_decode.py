"""The static-shape decode step (what the runner captures into CUDA graphs on a GPU).

On the CPU the padded, fixed-shape step runs eagerly, so what a graph would replay — the
static buffers, padding rows writing to the scratch block, block tables of full width,
``max_seq_len`` fixed at the context length — is checked here against the ordinary step:
same greedy tokens and logprobs, batch sizes that need padding, and requests that join and
leave between steps. The Triton backend runs through Triton's interpreter.
"""

from __future__ import annotations

import pytest
import torch
from tiny_engine import TinyModel

from rocmforge import SamplingParams
from rocmforge.attention import get_backend
from rocmforge.config import CacheConfig, SchedulerConfig
from rocmforge.engine.cuda_graphs import DecodeGraphs, capture_sizes
from rocmforge.engine.llm_engine import LLMEngine
from rocmforge.engine.model_runner import ModelRunner
from rocmforge.engine.scheduler import Scheduler
from rocmforge.gguf import read_gguf
from rocmforge.models.loader import load_model
from rocmforge.tokenizer import Tokenizer

BLOCK_SIZE = 8
NUM_BLOCKS = 48
MAX_MODEL_LEN = 96


def make_engine(tiny_model: TinyModel, *, backend: str, static_decode: bool, max_num_seqs: int = 6) -> LLMEngine:
    with read_gguf(tiny_model.path) as gguf:
        # The Triton backend runs with the fused RoPE + KV-write (and norm, SiLU) kernels, as on a GPU.
        loaded = load_model(gguf, device=torch.device("cpu"), dtype=torch.float32, attention=get_backend(backend),
                            weight_format="dense", fused_kernels=backend == "triton")
        tokenizer = Tokenizer.from_gguf_metadata(gguf.metadata)
    runner = ModelRunner(loaded.model, NUM_BLOCKS, BLOCK_SIZE, torch.device("cpu"), kv_dtype=torch.float32,
                         static_decode=static_decode, max_num_seqs=max_num_seqs, max_model_len=MAX_MODEL_LEN)
    scheduler = Scheduler(
        SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=64, max_model_len=MAX_MODEL_LEN),
        CacheConfig(block_size=BLOCK_SIZE), NUM_BLOCKS,
    )
    return LLMEngine(runner, tokenizer, scheduler)


def run(engine: LLMEngine, prompts: list[list[int]], max_tokens: list[int], *, stagger: bool) -> dict[str, list]:
    """Greedy generation; with ``stagger`` a new request joins every other step, so the
    decode batch size changes (and padding rows appear and vanish) from step to step."""
    pending = [(f"r{i}", p, n) for i, (p, n) in enumerate(zip(prompts, max_tokens))]
    results: dict[str, list] = {rid: [] for rid, _, _ in pending}
    step = 0
    while pending or engine.has_unfinished():
        if pending and (not stagger or step % 2 == 0):
            rid, prompt, n = pending.pop(0)
            engine.add_request(rid, prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=2))
        for output in engine.step():
            results[output.request_id].extend(
                (lp.token_id, lp.logprob) for lp in output.new_logprobs
            )
        step += 1
    return results


PROMPTS = [[5 + (7 * i + j) % 300 for j in range(length)] for i, length in enumerate((3, 9, 17, 1, 12, 8, 25))]
MAX_TOKENS = [6, 11, 4, 9, 7, 13, 5]


def assert_same(expected: dict[str, list], actual: dict[str, list], atol: float) -> None:
    assert expected.keys() == actual.keys()
    for rid in expected:
        assert [t for t, _ in actual[rid]] == [t for t, _ in expected[rid]], rid
        assert actual[rid] and len(actual[rid]) == len(expected[rid])
        for (_, want), (_, got) in zip(expected[rid], actual[rid]):
            assert got == pytest.approx(want, abs=atol), rid


@pytest.fixture(scope="module")
def eager_results(tiny_model: TinyModel) -> dict[str, list]:
    return run(make_engine(tiny_model, backend="torch", static_decode=False), PROMPTS, MAX_TOKENS, stagger=True)


def test_capture_sizes_cover_every_batch() -> None:
    assert capture_sizes(1) == [1]
    assert capture_sizes(6) == [1, 2, 4, 6]
    assert capture_sizes(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert capture_sizes(40) == [1, 2, 4, 8, 16, 32, 40]


def test_static_decode_with_the_torch_backend_matches_the_eager_step(tiny_model: TinyModel, eager_results) -> None:
    engine = make_engine(tiny_model, backend="torch", static_decode=True)
    graphs = engine.runner.decode_graphs
    assert isinstance(graphs, DecodeGraphs)
    calls: list[int] = []
    original = graphs.run

    def counting(scheduled):
        calls.append(len(scheduled))
        return original(scheduled)

    graphs.run = counting  # type: ignore[method-assign]
    assert_same(eager_results, run(engine, PROMPTS, MAX_TOKENS, stagger=True), atol=1e-5)
    # Decode steps went through the static path, at batch sizes that needed padding.
    assert len(calls) > 10 and {3, 5} & set(calls)


def test_static_decode_with_the_triton_backend_matches_the_eager_step(tiny_model: TinyModel, eager_results) -> None:
    engine = make_engine(tiny_model, backend="triton", static_decode=True)
    assert_same(eager_results, run(engine, PROMPTS, MAX_TOKENS, stagger=True), atol=1e-4)


def test_padding_rows_write_only_the_scratch_block(tiny_model: TinyModel) -> None:
    engine = make_engine(tiny_model, backend="torch", static_decode=True, max_num_seqs=8)
    runner = engine.runner
    # 3 requests decode together: the step pads to 4, the padding row's K/V go to the scratch block.
    for i in range(3):
        engine.add_request(f"p{i}", PROMPTS[i], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    engine.step()  # prefill
    snapshot = [k.clone() for k, _ in runner.kv_caches]
    owned = {b for request in engine.scheduler.running for b in request.block_ids}
    engine.step()  # one padded decode step
    for before, (after, _) in zip(snapshot, runner.kv_caches):
        changed = {int(b) for b in torch.nonzero((before != after).flatten(1).any(1)).flatten()}
        assert changed <= owned | {NUM_BLOCKS}, changed
        assert NUM_BLOCKS in changed  # the padding row wrote somewhere: the scratch block


def test_steps_the_static_path_does_not_take(tiny_model: TinyModel) -> None:
    engine = make_engine(tiny_model, backend="torch", static_decode=True, max_num_seqs=2)
    graphs = engine.runner.decode_graphs
    engine.add_request("logprobs", PROMPTS[1], SamplingParams(max_tokens=4, prompt_logprobs=1))
    engine.add_request("plain", PROMPTS[2], SamplingParams(max_tokens=4))
    prefill = engine.scheduler.schedule()
    assert not graphs.accepts(prefill.scheduled)  # several tokens per request
    engine.scheduler.update(prefill, engine.runner.execute(prefill))
    decode = engine.scheduler.schedule()
    assert [item.num_tokens for item in decode.scheduled] == [1, 1]
    # One token each, but prompt logprobs need the hidden states the graph does not keep.
    assert not graphs.accepts(decode.scheduled)
    assert graphs.accepts([item for item in decode.scheduled if item.request.request_id == "plain"])
    assert not graphs.accepts([])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_warm_up_touches_only_the_scratch_block(tiny_model: TinyModel, backend: str) -> None:
    runner = make_engine(tiny_model, backend=backend, static_decode=True).runner
    logits = runner.warm_up()
    assert logits.shape == (BLOCK_SIZE, tiny_model.spec.vocab_size) and torch.isfinite(logits).all()
    for k_cache, v_cache in runner.kv_caches:
        assert not k_cache[:NUM_BLOCKS].any() and not v_cache[:NUM_BLOCKS].any()
        assert k_cache[NUM_BLOCKS].any()


def test_a_failed_capture_leaves_decode_eager(tiny_model: TinyModel, caplog: pytest.LogCaptureFixture) -> None:
    engine = make_engine(tiny_model, backend="torch", static_decode=True)

    def fail() -> None:
        raise RuntimeError("operation not permitted when stream is capturing")

    engine.runner.decode_graphs.capture = fail  # type: ignore[method-assign]
    engine.runner.capture_decode_graphs()
    assert engine.runner.decode_graphs is None
    assert "decode steps run eagerly" in caplog.text
    engine.add_request("after", PROMPTS[0], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    tokens: list[int] = []
    while engine.has_unfinished():
        tokens += [t for output in engine.step() for t in output.new_token_ids]
    assert len(tokens) == 3


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_the_profile_step_runs_the_largest_step_inside_its_pool(tiny_model: TinyModel, backend: str) -> None:
    """What a GPU measures before its KV pool exists: a prefill of the whole token budget (the
    profiling pool holds exactly it), every sampler feature, prompt logprobs of the chunk and
    the largest padded decode step, writing nothing but that pool and the scratch block."""
    runner = make_engine(tiny_model, backend=backend, static_decode=True).runner
    tokens = (NUM_BLOCKS - 2) * BLOCK_SIZE - 3  # not a whole number of blocks
    runner.profile_step(tokens, num_seqs=6)
    used = -(-tokens // BLOCK_SIZE)
    for k_cache, v_cache in runner.kv_caches:
        assert k_cache[used - 1].any() and not k_cache[used:NUM_BLOCKS].any() and not v_cache[used:NUM_BLOCKS].any()
    with pytest.raises(ValueError, match="needs 49 blocks"):
        runner.profile_step(NUM_BLOCKS * BLOCK_SIZE + 1, num_seqs=6)
    with pytest.raises(ValueError, match="needs a GPU"):
        runner.measure_workspace(tokens, 6)


@pytest.mark.gpu
def test_the_gpu_pool_is_sized_from_a_measured_step(tiny_model: TinyModel) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA/ROCm GPU")
    from rocmforge import LLM

    llm = LLM(tiny_model.path, device="cuda", max_num_batched_tokens=512, max_num_seqs=8)
    plan = llm.memory_plan
    assert plan.workspace_bytes > 0 and plan.num_blocks > 0
    # The measured workspace covers what a full step allocates: run one and compare.
    runner = llm.engine.runner
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    runner.profile_step(512, 8)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before <= plan.workspace_bytes
