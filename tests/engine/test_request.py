"""Request token bookkeeping."""

from __future__ import annotations

from rocmforge.engine.request import FinishReason, Request, RequestState
from rocmforge.sampling_params import SamplingParams


def test_token_views_follow_appends() -> None:
    prompt = [5, 6, 7]
    req = Request("r", prompt, SamplingParams(max_tokens=4))
    prompt.append(99)  # the request keeps its own copy
    assert req.all_token_ids == [5, 6, 7]
    assert (req.num_tokens, req.num_prompt_tokens, req.num_output_tokens) == (3, 3, 0)
    req.append_token(8)
    req.append_token(9)
    assert req.all_token_ids == [5, 6, 7, 8, 9]
    assert req.output_token_ids == [8, 9]
    assert req.prompt_token_ids == [5, 6, 7]
    assert (req.num_tokens, req.num_prompt_tokens, req.num_output_tokens) == (5, 3, 2)


def test_all_token_ids_is_not_rebuilt() -> None:
    req = Request("r", [1, 2], SamplingParams())
    view = req.all_token_ids
    req.append_token(3)
    assert view is req.all_token_ids and view == [1, 2, 3]


def test_initial_output_and_defaults() -> None:
    eos: list[int] = [2]  # frozen into a frozenset
    req = Request("r", [1], SamplingParams(), eos, output_token_ids=[4])  # type: ignore[arg-type]
    assert req.all_token_ids == [1, 4]
    assert req.eos_token_ids == frozenset({2})
    assert req.state is RequestState.QUEUED and not req.is_finished
    assert req.block_ids == [] and req.num_computed_tokens == 0
    assert req.first_scheduled_time is None and req.first_token_time is None
    assert req.finished_time is None and req.finish_reason is None


def test_defaults_are_not_shared_between_requests() -> None:
    a = Request("a", [1], SamplingParams())
    b = Request("b", [1], SamplingParams())
    a.append_token(2)
    a.block_ids.append(0)
    assert b.output_token_ids == [] and b.block_ids == [] and b.all_token_ids == [1]


def test_enums_are_strings() -> None:
    assert RequestState.DECODE == "decode"
    assert FinishReason.LENGTH.value == "length"
    state = Request("r", [1], SamplingParams())
    state.state = RequestState.FINISHED
    assert state.is_finished
