"""The synchronous engine core: one ``step()`` = schedule, execute, update, detokenize.

In: requests (token ids + sampling parameters) through :meth:`LLMEngine.add_request`.
Out: :class:`~rocmforge.outputs.RequestOutput` per request that made progress in a step.

It owns the scheduler (integers), the model runner (tensors) and one detokenizer per live
request; the async server engine and ``rocmforge.LLM`` both drive this class.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from rocmforge.engine.detokenizer import DetokenizerUpdate, IncrementalDetokenizer
from rocmforge.engine.model_runner import ModelRunner
from rocmforge.engine.request import FinishReason, Request
from rocmforge.engine.scheduler import Scheduler
from rocmforge.outputs import RequestOutput, TokenLogprobs
from rocmforge.sampling_params import SamplingParams
from rocmforge.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Live:
    """Engine-side bookkeeping of a request that is not finished yet."""

    request: Request
    detokenizer: IncrementalDetokenizer
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)


class LLMEngine:
    def __init__(
        self,
        runner: ModelRunner,
        tokenizer: Tokenizer,
        scheduler: Scheduler,
    ) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self._live: dict[str, _Live] = {}

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> Request:
        request = Request(
            request_id=request_id,
            prompt_token_ids=list(prompt_token_ids),
            params=params,
            eos_token_ids=self.tokenizer.stop_ids,
        )
        self.scheduler.add_request(request)
        self._live[request_id] = _Live(request, IncrementalDetokenizer(self.tokenizer, params))
        return request

    def abort(self, request_id: str, reason: FinishReason = FinishReason.CANCELLED) -> None:
        """Finish a request now (client cancel, error); frees its KV blocks before the next step."""
        self.scheduler.finish_request(request_id, reason)
        self._forget(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        if not out.scheduled:
            return []
        result = self.runner.execute(out)
        for request_id, (start, entries) in result.prompt_logprobs.items():
            # Entry i is for prompt position start + 1 + i; a recompute after preemption
            # delivers positions again, so overwrite rather than append.
            known = self._live[request_id].prompt_logprobs
            del known[start:]
            known.extend(entries)
        updated = self.scheduler.update(out, result)
        return [self._output(request, result.logprobs.get(request.request_id)) for request in updated]

    def _output(self, request: Request, logprobs: TokenLogprobs | None) -> RequestOutput:
        """Detokenize a request's new token, apply stop strings, and package the step's output."""
        live = self._live[request.request_id]
        # ERROR here means the runner gave it no token this step (Scheduler.update).
        token = None if request.finish_reason is FinishReason.ERROR else request.output_token_ids[-1]
        update = live.detokenizer.add(token) if token is not None else DetokenizerUpdate("")
        delta = update.delta
        stop_reason: str | int | None = None
        if update.stop is not None:
            stop_reason = update.stop
            if not request.is_finished:
                self.scheduler.finish_request(request.request_id, FinishReason.STOP)
            elif request.finish_reason is FinishReason.LENGTH:
                # The same token hit max_tokens: the text ends at the stop string, say so.
                request.finish_reason = FinishReason.STOP
        elif request.finish_reason is FinishReason.STOP:
            stop_reason = token
        output = RequestOutput(
            request_id=request.request_id,
            new_token_ids=[token] if token is not None else [],
            delta_text=delta,
            text=live.detokenizer.text,
            finished=request.is_finished,
            num_prompt_tokens=request.num_prompt_tokens,
            num_output_tokens=request.num_output_tokens,
            new_logprobs=[logprobs] if logprobs is not None else [],
        )
        if live.prompt_logprobs and request.num_output_tokens == 1:
            output.prompt_logprobs = live.prompt_logprobs
        if request.is_finished:
            output.delta_text += live.detokenizer.finish()
            output.text = live.detokenizer.text
            output.finish_reason = request.finish_reason.value if request.finish_reason else None
            output.stop_reason = stop_reason
            output.error = request.error
            self._forget(request.request_id)
        return output

    def _forget(self, request_id: str) -> None:
        self._live.pop(request_id, None)
        self.runner.release(request_id)
