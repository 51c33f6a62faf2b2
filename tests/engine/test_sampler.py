"""The sampler on synthetic logits, then sampling parameters through ``LLM`` on the tiny model.

Each sampling parameter has a test that fails if it is ignored: empirical distributions are
compared with the exact filtered, tempered softmax (a chi-square bound far in the tail, so a
correct sampler fails about once in 10^5 runs; the draws are seeded, so in practice never),
penalties with exact logit values.
"""

from __future__ import annotations

import math

import pytest
import torch
from tiny_engine import assert_pool_idle

from rocmforge import SamplingParams
from rocmforge.engine.sampler import Sampler, SamplingBatch, apply_penalties

NEG_INF = float("-inf")


def make_batch(
    params: list[SamplingParams],
    prompt_ids: list[list[int]] | None = None,
    output_ids: list[list[int]] | None = None,
    seeds: list[int | None] | None = None,
) -> SamplingBatch:
    n = len(params)
    generators = [
        None if s is None else torch.Generator().manual_seed(s) for s in (seeds or [p.seed for p in params])
    ]
    return SamplingBatch(
        params=list(params),
        prompt_ids=prompt_ids or [[0] for _ in range(n)],
        output_ids=output_ids or [[] for _ in range(n)],
        generators=generators,
        suppressed=[frozenset() for _ in range(n)],
    )


def draw(logits: list[float], params: SamplingParams, num: int = 20_000, seed: int = 0) -> torch.Tensor:
    """``num`` draws from one row of logits (as ``num`` identical rows of one batch)."""
    torch.manual_seed(seed)
    rows = torch.tensor([logits] * num, dtype=torch.float32)
    return Sampler()(rows, make_batch([params] * num)).token_ids


def chi_square(samples: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's statistic of the samples against ``probs`` (over tokens with p > 0)."""
    counts = torch.bincount(samples, minlength=len(probs)).double()
    expected = probs.double() * len(samples)
    support = expected > 0
    assert counts[~support].sum() == 0, f"sampled tokens of probability 0: {counts[~support]}"
    return float(((counts[support] - expected[support]) ** 2 / expected[support]).sum())


def chi_square_bound(dof: int) -> float:
    """About the 1 - 1e-5 quantile of chi-square(dof) (Wilson-Hilferty, z = 4.27)."""
    z = 4.27
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def assert_distribution(samples: torch.Tensor, probs: torch.Tensor) -> None:
    dof = int((probs > 0).sum()) - 1
    stat = chi_square(samples, probs)  # also checks that nothing outside the support came
    if dof == 0:
        return
    assert stat < chi_square_bound(dof), f"chi2 {stat:.1f} (dof {dof}) vs {probs.tolist()}"


LOGITS = [2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, -3.0]


# --- temperature, greedy ------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_distribution(temperature: float) -> None:
    samples = draw(LOGITS, SamplingParams(temperature=temperature))
    assert_distribution(samples, torch.softmax(torch.tensor(LOGITS) / temperature, dim=-1))
    # The bound is sharp enough to tell neighbouring temperatures apart.
    other = torch.softmax(torch.tensor(LOGITS) / (temperature * 1.25), dim=-1)
    assert chi_square(samples, other) > chi_square_bound(len(LOGITS) - 1)


def test_low_temperature_concentrates_on_argmax() -> None:
    samples = draw(LOGITS, SamplingParams(temperature=0.05), num=5000)
    assert (samples == 0).float().mean() > 0.999
    spread = draw(LOGITS, SamplingParams(temperature=5.0), num=5000)
    assert (spread == 0).float().mean() < 0.35 and len(spread.unique()) == len(LOGITS)


def test_greedy_is_argmax_even_with_filters_and_in_mixed_batches() -> None:
    torch.manual_seed(1)
    logits = torch.randn(16, 1000)
    greedy = SamplingParams(temperature=0.0, top_k=3, top_p=0.2, min_p=0.5, seed=4)
    sampling = SamplingParams(temperature=1.5)
    params = [greedy if i % 2 else sampling for i in range(16)]
    tokens = Sampler()(logits, make_batch(params)).token_ids
    assert torch.equal(tokens[1::2], logits[1::2].argmax(dim=-1))
    assert not torch.equal(tokens[0::2], logits[0::2].argmax(dim=-1))  # the others sample
    all_greedy = Sampler()(logits, make_batch([SamplingParams(temperature=0.0)] * 16)).token_ids
    assert torch.equal(all_greedy, logits.argmax(dim=-1))


# --- top-k, top-p, min-p ------------------------------------------------------------------


def _renormalized(probs: list[float], keep: set[int]) -> torch.Tensor:
    kept = torch.tensor([p if i in keep else 0.0 for i, p in enumerate(probs)])
    return kept / kept.sum()


def test_top_k_never_samples_outside_the_k_best() -> None:
    torch.manual_seed(3)
    logits = torch.randn(50).tolist()
    best = set(torch.tensor(logits).topk(5).indices.tolist())
    samples = draw(logits, SamplingParams(temperature=3.0, top_k=5))
    probs = torch.softmax(torch.tensor(logits) / 3.0, dim=-1).tolist()
    assert set(samples.tolist()) == best
    assert_distribution(samples, _renormalized(probs, best))
    unfiltered = draw(logits, SamplingParams(temperature=3.0, top_k=0), num=2000)
    assert not set(unfiltered.tolist()) <= best  # the test would see top_k being ignored


PROBS = [0.05, 0.5, 0.15, 0.3]  # best first: 1, 3, 2, 0


@pytest.mark.parametrize(
    ("top_p", "nucleus"),
    [
        (0.45, {1}),  # the best token alone already covers 0.45
        (0.75, {1, 3}),  # 0.5 < 0.75: token 3 crosses the threshold and is included
        (0.85, {1, 3, 2}),  # 0.8 < 0.85: token 2 crosses it
        (0.96, {1, 3, 2, 0}),
        (1.0, {1, 3, 2, 0}),
    ],
)
def test_top_p_samples_exactly_the_nucleus(top_p: float, nucleus: set[int]) -> None:
    logits = torch.tensor(PROBS).log().tolist()
    samples = draw(logits, SamplingParams(top_p=top_p))
    assert set(samples.tolist()) == nucleus
    assert_distribution(samples, _renormalized(PROBS, nucleus))


def test_top_p_applies_to_the_top_k_renormalized_distribution() -> None:
    # top-k keeps {1, 3}: renormalized 0.625, 0.375. top_p 0.6 keeps token 1 only (it would
    # keep 3 too if the mass were taken from the unfiltered 0.5).
    logits = torch.tensor(PROBS).log().tolist()
    samples = draw(logits, SamplingParams(top_k=2, top_p=0.6), num=3000)
    assert set(samples.tolist()) == {1}
    samples = draw(logits, SamplingParams(top_k=2, top_p=0.7), num=3000)
    assert set(samples.tolist()) == {1, 3}


def test_top_p_with_temperature_uses_the_tempered_distribution() -> None:
    # At T = 0.5 the probabilities become p^2 / sum p^2: token 1 alone has 0.69 > 0.6.
    logits = torch.tensor(PROBS).log().tolist()
    samples = draw(logits, SamplingParams(temperature=0.5, top_p=0.6), num=3000)
    assert set(samples.tolist()) == {1}


@pytest.mark.parametrize(
    ("min_p", "kept"),
    [
        (0.05, {1, 3, 2, 0}),  # threshold 0.025
        (0.2, {1, 3, 2}),  # threshold 0.1
        (0.5, {1, 3}),  # threshold 0.25
        (0.7, {1}),  # threshold 0.35
    ],
)
def test_min_p_drops_tokens_below_a_fraction_of_the_best(min_p: float, kept: set[int]) -> None:
    logits = torch.tensor(PROBS).log().tolist()
    samples = draw(logits, SamplingParams(min_p=min_p))
    assert set(samples.tolist()) == kept
    assert_distribution(samples, _renormalized(PROBS, kept))


# --- penalties ------------------------------------------------------------------------------


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0, 0.5, 0.0]])
    batch = make_batch([SamplingParams(repetition_penalty=2.0)], prompt_ids=[[0, 5]], output_ids=[[1, 1]])
    penalized = apply_penalties(logits, batch)
    assert penalized.tolist() == [[1.0, -4.0, 1.0, -1.0, 0.5, 0.0]]
    assert logits.tolist() == [[2.0, -2.0, 1.0, -1.0, 0.5, 0.0]]  # not modified in place
    # A penalty below 1 encourages instead.
    batch = make_batch([SamplingParams(repetition_penalty=0.5)], prompt_ids=[[2]], output_ids=[[3]])
    assert apply_penalties(logits, batch).tolist() == [[2.0, -2.0, 2.0, -0.5, 0.5, 0.0]]


def test_repetition_penalty_lowers_a_repeated_tokens_probability() -> None:
    logits = torch.tensor([[1.5, 1.2, -0.3, 0.4]])
    sampler = Sampler()
    for prompt, output in (([0], []), ([2], [0])):  # seen in the prompt, or in the output
        batch = make_batch([SamplingParams(temperature=0.0, repetition_penalty=1.5)], [prompt], [output])
        assert sampler(logits, batch).token_ids.tolist() == [1]
        before = torch.softmax(logits, -1)[0, 0]
        after = torch.softmax(apply_penalties(logits, batch), -1)[0, 0]
        assert after < before
    unpenalized = make_batch([SamplingParams(temperature=0.0)], [[0]], [[0]])
    assert sampler(logits, unpenalized).token_ids.tolist() == [0]


def test_presence_and_frequency_penalties_are_exact_shifts_per_row() -> None:
    logits = torch.zeros(3, 6)
    params = [
        SamplingParams(presence_penalty=0.5, frequency_penalty=0.25),
        SamplingParams(presence_penalty=-1.0),
        SamplingParams(frequency_penalty=-0.5, repetition_penalty=1.0),
    ]
    # Prompt tokens are not penalised by presence/frequency (only the output).
    batch = make_batch(params, prompt_ids=[[4], [4], [4]], output_ids=[[3, 3, 3, 1], [2, 2], [5, 0, 5]])
    penalized = apply_penalties(logits, batch).tolist()
    assert penalized[0] == [0.0, -0.75, 0.0, -1.25, 0.0, 0.0]
    assert penalized[1] == [0.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    assert penalized[2] == [0.5, 0.0, 0.0, 0.0, 0.0, 1.0]


def test_penalties_change_the_greedy_choice() -> None:
    logits = torch.tensor([[3.0, 2.6, 1.0]])
    for params in (SamplingParams(temperature=0.0, presence_penalty=0.5),
                   SamplingParams(temperature=0.0, frequency_penalty=0.25)):
        token = Sampler()(logits, make_batch([params], [[1]], [[0, 0]])).token_ids.item()
        assert token == 1, params


def test_logit_bias_shifts_exactly_the_named_tokens_per_row() -> None:
    logits = torch.tensor([[3.0, 2.6, 1.0, 0.5], [3.0, 2.6, 1.0, 0.5]])
    banned = SamplingParams(temperature=0.0, logit_bias={0: -100})
    forced = SamplingParams(temperature=0.0, logit_bias=[(3, 100.0), (1, -1.5)])
    out = Sampler()(logits, make_batch([banned, forced]))
    assert out.token_ids.tolist() == [1, 3]
    # Sampled rows see the bias as an exact shift: with temperature 1, token 2 +2.0 and the
    # rest unchanged gives softmax([3, 2.6, 3, 0.5]).
    params = SamplingParams(temperature=1.0, logit_bias={2: 2.0})
    samples = draw([3.0, 2.6, 1.0, 0.5], params)
    probs = torch.softmax(torch.tensor([3.0, 2.6, 3.0, 0.5]), dim=-1)
    assert chi_square(samples, probs) < chi_square_bound(3)


def test_logit_bias_leaves_the_logprobs_of_the_model() -> None:
    logits = torch.tensor([[3.0, 2.6, 1.0, 0.5]])
    out = Sampler()(logits, make_batch([SamplingParams(temperature=0.0, logprobs=1, logit_bias={3: 100})]))
    assert out.token_ids.item() == 3
    assert out.logprobs[0, 0].item() == pytest.approx(torch.log_softmax(logits, -1)[0, 3].item())


@pytest.mark.parametrize("bias", [{1: 101}, {1: float("nan")}, {-1: 5}, [(1, 1.0), (1, 2.0)], {1: "5"}, "x",
                                  {i: 1.0 for i in range(1025)}])
def test_logit_bias_is_validated(bias: object) -> None:
    from rocmforge.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError) as raised:
        SamplingParams(logit_bias=bias)
    assert raised.value.param == "logit_bias"


# --- seeds -------------------------------------------------------------------------------------


def _seeded_run(position: int, others: list[SamplingParams], steps: int = 12) -> list[int]:
    """Tokens of the seed-42 request, sampled at row ``position`` among ``others``."""
    torch.manual_seed(position)  # the unseeded rows' draws differ between runs
    target = SamplingParams(temperature=1.0, seed=42)
    params = list(others)
    params.insert(position, target)
    batch = make_batch(params)
    logits_gen = torch.Generator().manual_seed(7)
    tokens = []
    for _ in range(steps):
        logits = torch.randn(len(params), 64, generator=logits_gen) * 0.5
        target_row = torch.randn(64, generator=torch.Generator().manual_seed(len(tokens))) * 0.5
        logits[position] = target_row
        tokens.append(Sampler()(logits, batch).token_ids[position].item())
    return tokens


def test_seeded_rows_are_reproducible_whatever_the_batch() -> None:
    alone = _seeded_run(0, [])
    assert len(set(alone)) > 3  # it really samples
    assert _seeded_run(0, []) == alone
    mixed = [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7, seed=1),
        SamplingParams(temperature=0.0),
    ]
    assert _seeded_run(2, mixed) == alone
    assert _seeded_run(3, mixed) == alone
    assert _seeded_run(1, [SamplingParams(temperature=1.0, seed=42)] * 5) == alone


def test_different_seeds_give_different_tokens() -> None:
    logits = torch.zeros(4, 1000)
    params = [SamplingParams(seed=s) for s in (1, 2, 3, 1)]
    tokens = Sampler()(logits, make_batch(params)).token_ids.tolist()
    assert len(set(tokens[:3])) == 3
    assert tokens[0] == tokens[3]  # same seed, own generator each


# --- logprobs ---------------------------------------------------------------------------------


def test_logprobs_are_those_of_the_raw_logits() -> None:
    torch.manual_seed(5)
    logits = torch.randn(4, 100) * 3
    params = [
        SamplingParams(temperature=0.0, logprobs=5),
        SamplingParams(temperature=0.7, top_k=10, logprobs=3, repetition_penalty=1.3),
        SamplingParams(temperature=1.0),  # asks for none
        SamplingParams(temperature=1.0, logprobs=0, presence_penalty=1.0),
    ]
    batch = make_batch(params, prompt_ids=[[1, 2]] * 4, output_ids=[[3]] * 4)
    out = Sampler()(logits, batch)
    assert out.logprobs is not None and out.top_ids is not None
    reference = torch.log_softmax(logits.double(), dim=-1)
    chosen = reference.gather(1, out.token_ids[:, None])[:, 0]
    torch.testing.assert_close(out.logprobs[:, 0].double(), chosen, atol=1e-5, rtol=0)
    values, ids = reference.topk(5, dim=-1)
    assert torch.equal(out.top_ids, ids)
    torch.testing.assert_close(out.logprobs[:, 1:].double(), values, atol=1e-5, rtol=0)
    assert (out.logprobs[:, 1:].diff(dim=-1) <= 0).all()  # best first


def test_no_logprobs_asked_returns_none() -> None:
    out = Sampler()(torch.randn(2, 10), make_batch([SamplingParams(), SamplingParams(temperature=0.0)]))
    assert out.logprobs is None and out.top_ids is None


# --- masked tokens ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.01),
        SamplingParams(temperature=100.0),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=2.0, top_k=50, top_p=0.9, min_p=0.1),
        SamplingParams(temperature=1.0, repetition_penalty=1.7, presence_penalty=2.0, frequency_penalty=2.0),
        SamplingParams(temperature=0.5, top_p=0.999, repetition_penalty=0.5, logprobs=20),
    ],
)
def test_masked_tokens_are_never_sampled_and_nothing_is_nan(params: SamplingParams) -> None:
    torch.manual_seed(2)
    rows = 2000
    logits = torch.randn(rows, 40)
    masked = torch.rand(rows, 40) < 0.5
    masked[:, 0] = False  # at least one live token per row
    masked[:5, 1:] = True  # rows with a single live token
    logits = logits.masked_fill(masked, NEG_INF)
    batch = make_batch(
        [params] * rows, prompt_ids=[[1, 2, 3]] * rows, output_ids=[[3, 4, 4, 5]] * rows
    )
    out = Sampler()(logits, batch)
    assert not masked.gather(1, out.token_ids[:, None]).any()
    assert (out.token_ids[:5] == 0).all()
    if out.logprobs is not None:
        assert not out.logprobs.isnan().any()
        assert torch.isfinite(out.logprobs[:, 0]).all()


# --- through the LLM on the tiny model -----------------------------------------------------------

PROMPT = "Once upon a time, in a small village"


def test_seeded_generation_is_reproducible_across_calls_and_batches(make_llm) -> None:
    llm = make_llm(block_size=4, max_num_seqs=16)
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=20, ignore_eos=True)
    [alone] = llm.generate(PROMPT, params)
    assert len(set(alone.token_ids)) > 5
    assert llm.generate(PROMPT, params)[0].token_ids == alone.token_ids
    # In a batch of 8 with other prompts and other seeds, at another row position.
    others = [SamplingParams(temperature=1.0, seed=s, max_tokens=5 + s, ignore_eos=True) for s in range(7)]
    prompts = ["Hello, world!", PROMPT, "def add(a, b):", "x", PROMPT, [5, 6, 7], "1, 2, 3"]
    batch_prompts = prompts[:3] + [PROMPT] + prompts[3:]
    batch_params = others[:3] + [params] + others[3:]
    batched = llm.generate(batch_prompts, batch_params)
    assert batched[3].token_ids == alone.token_ids
    # The same prompt with other seeds (rows 1 and 5) gives other tokens.
    for row in (1, 5):
        assert batch_prompts[row] == PROMPT and batch_params[row].seed != params.seed
        assert batched[row].token_ids != alone.token_ids[: len(batched[row].token_ids)]
    unseeded = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=20, ignore_eos=True)
    assert llm.generate(PROMPT, unseeded)[0].token_ids != alone.token_ids
    assert_pool_idle(llm)


def _clean(text: str) -> bool:
    """Printable text, no replacement character (random weights emit stray bytes)."""
    return text.isprintable() and "\ufffd" not in text and bool(text.strip())


@pytest.fixture(scope="module")
def greedy_run(make_llm):
    """A long greedy completion of PROMPT, ignoring EOS."""
    llm = make_llm(block_size=4)
    [out] = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    return out


def test_stop_string_ends_the_text_before_it(make_llm, greedy_run) -> None:
    text = greedy_run.text
    # A 3-character stop string from the middle of the text, first occurrence at i.
    i = next(i for i in range(8, len(text) - 3) if _clean(text[i : i + 3]))
    stop = text[i : i + 3]
    i = text.index(stop)
    llm = make_llm(block_size=4)
    base = dict(temperature=0.0, max_tokens=40, ignore_eos=True)
    [out] = llm.generate(PROMPT, SamplingParams(**base, stop=[stop, "\x00never"]))
    assert out.text == text[:i]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)
    assert out.token_ids == greedy_run.token_ids[: len(out.token_ids)]
    assert len(out.token_ids) < len(greedy_run.token_ids)
    # The token that completed the stop string was the last one generated.
    completed = llm.detokenize(out.token_ids)
    assert stop in completed and stop not in llm.detokenize(out.token_ids[:-1])
    # min_tokens: a stop string completed before min_tokens tokens is part of the text;
    # completed by the min_tokens-th token, it ends generation (as a stop token would).
    n = len(out.token_ids)
    [same] = llm.generate(PROMPT, SamplingParams(**{**base, "stop": [stop], "min_tokens": n}))
    assert (same.token_ids, same.text, same.stop_reason) == (out.token_ids, out.text, stop)
    [past] = llm.generate(PROMPT, SamplingParams(**{**base, "stop": [stop], "min_tokens": n + 1}))
    assert len(past.token_ids) > n and past.text.startswith(text[: i + len(stop)])
    assert past.token_ids == greedy_run.token_ids[: len(past.token_ids)]
    assert_pool_idle(llm)


def test_stop_string_completed_by_the_last_allowed_token_is_a_stop(make_llm) -> None:
    """max_tokens and a stop string on the same token: the text ends before the stop string,
    so the finish reason must say so (as vLLM: the stop string wins)."""
    llm = make_llm(max_num_seqs=40)
    candidates = [[(5 * i + 11 * j) % 300 + 3 for j in range(2 + i % 7)] for i in range(40)]
    greedy = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    for full in llm.generate(candidates, greedy):
        stop = full.text[-3:]
        if len(stop) == 3 and _clean(stop) and stop not in full.text[:-1]:
            break
    else:
        pytest.fail("no candidate ends with a clean 3-character text: widen the search")
    prompt = full.prompt_token_ids
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, stop=[stop])
    [out] = llm.generate([prompt], params)
    assert out.token_ids == full.token_ids and out.text == full.text[:-3]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)
    [last] = [o for o in llm.stream(prompt, params) if o.finished]
    assert (last.finish_reason, last.stop_reason, last.text) == ("stop", stop, full.text[:-3])
    assert_pool_idle(llm)


def test_stop_token_ids(make_llm, greedy_run) -> None:
    tokens = greedy_run.token_ids
    k = next(k for k in range(4, len(tokens)) if tokens[k] not in tokens[:k])
    llm = make_llm()
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop_token_ids=[tokens[k]])
    [out] = llm.generate(PROMPT, params)
    assert out.token_ids == tokens[: k + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", tokens[k])


def test_logit_bias_through_the_engine(make_llm, greedy_run) -> None:
    """Banning the greedy run's first token moves the choice; forcing one repeats it; an id
    outside the vocabulary is refused before anything is queued."""
    from rocmforge.errors import InvalidRequestError

    llm = make_llm()
    first = greedy_run.token_ids[0]
    [banned] = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=3, logit_bias={first: -100}))
    assert banned.token_ids[0] != first
    forced = next(t for t in range(100, 200) if t != first)
    [out] = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True,
                                                logit_bias={forced: 100}))
    assert out.token_ids == [forced] * 4
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        llm.generate(PROMPT, SamplingParams(logit_bias={llm.config.vocab_size: 1.0}))


def test_max_tokens_finishes_with_length(make_llm, greedy_run) -> None:
    llm = make_llm()
    [out] = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True))
    assert out.token_ids == greedy_run.token_ids[:7]
    assert (out.finish_reason, out.stop_reason) == ("length", None)


@pytest.fixture(scope="module")
def eos_case(make_llm):
    """A prompt whose greedy completion produces an end-of-sequence token at index k >= 2."""
    llm = make_llm(max_num_seqs=64)
    stop_ids = llm.tokenizer.stop_ids
    candidates = [[(7 * i + 3 * j) % 311 + 3 for j in range(1 + i % 9)] for i in range(64)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    for prompt, out in zip(candidates, llm.generate(candidates, params)):
        k = next((k for k, t in enumerate(out.token_ids) if t in stop_ids), None)
        if k is not None and 2 <= k <= 16:
            return prompt, out.token_ids, k
    pytest.fail("no candidate prompt produced an end-of-sequence token: widen the search")


def test_eos_min_tokens_and_ignore_eos(make_llm, eos_case) -> None:
    prompt, full, k = eos_case
    eos = full[k]
    llm = make_llm()
    [out] = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=24))
    assert out.token_ids == full[: k + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", eos)
    # min_tokens (vLLM semantics): stop tokens cannot be drawn before min_tokens tokens exist.
    [out] = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=24, min_tokens=k + 3))
    assert out.token_ids[:k] == full[:k]
    assert out.token_ids[k] != eos
    assert not any(t in llm.tokenizer.stop_ids for t in out.token_ids[: k + 3])
    assert len(out.token_ids) >= k + 3
    # ignore_eos: runs to max_tokens through the end-of-sequence token.
    [out] = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
    assert (out.token_ids, out.finish_reason) == (full, "length")
    assert_pool_idle(llm)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_logprobs_match_prompt_logprobs_of_the_completed_sequence(make_llm, temperature: float) -> None:
    llm = make_llm(block_size=4)
    prompt = llm.tokenize(PROMPT)
    params = SamplingParams(temperature=temperature, seed=3, max_tokens=12, ignore_eos=True, logprobs=2)
    [out] = llm.generate([prompt], params)
    assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids)
    reference = llm.prompt_logprobs(prompt + out.token_ids, top_k=2)
    for i, (entry, token) in enumerate(zip(out.logprobs, out.token_ids)):
        ref = reference[len(prompt) - 1 + i]
        assert entry.token_id == ref.token_id == token
        assert abs(entry.logprob - ref.logprob) <= 1e-4
        assert [t for t, _ in entry.top] == [t for t, _ in ref.top]
        assert all(abs(a - b) <= 1e-4 for (_, a), (_, b) in zip(entry.top, ref.top))
        if temperature == 0.0:
            assert entry.top[0][0] == token
    if temperature > 0:  # the sampled run did not just take the best token
        assert any(entry.top[0][0] != entry.token_id for entry in out.logprobs)
    assert_pool_idle(llm)


def test_suppressed_tokens_are_never_drawn() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.0]] * 200)
    batch = make_batch([SamplingParams(temperature=0.0)] * 100 + [SamplingParams(temperature=1.0)] * 100)
    batch.suppressed = [frozenset({1})] * 100 + [frozenset({1, 3})] * 100
    tokens = Sampler()(logits, batch).token_ids
    assert tokens[:100].eq(3).all()  # greedy falls to the best allowed token
    assert not tokens[100:].eq(1).any() and not tokens[100:].eq(3).any()
