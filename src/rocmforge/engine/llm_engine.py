"""The synchronous engine core: one ``step()`` = schedule, execute, update, detokenize.

In: requests (token ids + sampling parameters, or pooling parameters for an embedding request)
through :meth:`LLMEngine.add_request`.
Out: :class:`~rocmforge.outputs.RequestOutput` per request that made progress in a step (an
embedding request's one output is its final one, carrying the vector).

Embedding requests pool with their :class:`~rocmforge.pooling_params.PoolingParams`'
``pooling``, or the engine's (:attr:`LLMEngine.pooling`: the ``pooling`` setting, by default
the model file's); without either they are refused (``EmbeddingsUnsupportedError``).

It owns the scheduler (integers), the model runner (tensors) and one detokenizer per live
request; the async server engine and ``rocmforge.LLM`` both drive this class.

A step whose forward pass fails is recovered by the rules of :mod:`rocmforge.engine.recovery`
(shrink after out-of-memory, retry transient errors, run requests one at a time, probe the
device): a bad request fails alone; ``step()`` raises only when the device is at fault (its
probe fails too) or for a fatal error. Building a request's output (detokenizing, stop
strings) fails that request alone too.

Validation: :meth:`add_request` checks every token id it is given (prompt, stop tokens)
against the vocabulary, so no request can carry an id the model cannot embed or the
detokenizer cannot decode.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from rocmforge.engine.detokenizer import DetokenizerUpdate, IncrementalDetokenizer
from rocmforge.engine.model_runner import ModelRunner
from rocmforge.engine.recovery import RecoveryPolicy, run_step
from rocmforge.engine.request import FinishReason, Request
from rocmforge.engine.scheduler import Scheduler
from rocmforge.errors import EmbeddingsUnsupportedError, InvalidRequestError
from rocmforge.outputs import RequestOutput, TokenLogprobs
from rocmforge.pooling_params import PoolingParams, PoolingType
from rocmforge.sampling_params import SamplingParams
from rocmforge.structured.compiler import GrammarCompiler
from rocmforge.structured.matcher import GrammarMatcher
from rocmforge.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Live:
    """Engine-side bookkeeping of a request that is not finished yet."""

    request: Request
    detokenizer: IncrementalDetokenizer | None
    """None for an embedding request (no output text)."""
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)


class LLMEngine:
    def __init__(
        self,
        runner: ModelRunner,
        tokenizer: Tokenizer,
        scheduler: Scheduler,
        recovery: RecoveryPolicy | None = None,
        *,
        pooling: PoolingType | None = None,
        no_pooling_reason: str = "no pooling is configured",
    ) -> None:
        """``pooling``: what embedding requests pool with unless they say; None: they must
        say, and ``no_pooling_reason`` tells those that do not why there is none."""
        self.runner = runner
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.recovery = recovery or RecoveryPolicy()
        """Retry bounds for failed steps; assign another policy to change them."""
        self.grammars = GrammarCompiler(tokenizer)
        """Compiles structured-output constraints (``SamplingParams.structured``)."""
        self.pooling = pooling
        self.no_pooling_reason = no_pooling_reason
        self._live: dict[str, _Live] = {}

    @property
    def vocab_size(self) -> int:
        """Token ids ``[0, vocab_size)`` are valid everywhere ids are accepted."""
        return min(self.tokenizer.vocab_size, self.runner.vocab_size)

    def check_request(self, prompt_token_ids: Sequence[int], params: SamplingParams | PoolingParams) -> list[int]:
        """What :meth:`add_request` checks about the request itself (not the engine's state):
        the prompt is a non-empty list of ids in the vocabulary, the stop token ids and the
        ``logit_bias`` ids are in it,
        and prompt + ``max_tokens`` fit the context window. An embedding request: the prompt
        fits the context window, there is a pooling, and ``dimensions`` is at most the
        hidden size. Returns the prompt as a list.
        Raises :class:`InvalidRequestError` / ``ContextLengthExceededError``. It reads only
        what never changes after construction, so any thread may call it (the async engine
        does, on the event loop, before posting a submit)."""
        if isinstance(params, PoolingParams):
            ids = check_token_ids(prompt_token_ids, self.vocab_size, "prompt")
            self.pooling_params(params)
            self.scheduler.check_length(len(ids), 0, param="prompt")
            return ids
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("params must be a SamplingParams or a PoolingParams", param="params")
        ids = check_token_ids(prompt_token_ids, self.vocab_size, "prompt")
        check_token_ids(params.stop_token_ids, self.vocab_size, "stop_token_ids", allow_empty=True)
        check_token_ids(params.keep_special_token_ids, self.vocab_size, "keep_special_token_ids", allow_empty=True)
        check_token_ids([token for token, _ in params.logit_bias], self.vocab_size, "logit_bias", allow_empty=True)
        self.scheduler.check_length(len(ids), params.max_tokens)
        return ids

    def pooling_params(self, params: PoolingParams) -> PoolingParams:
        """``params`` with the engine's pooling filled in where they name none; raises
        ``EmbeddingsUnsupportedError`` when there is none, ``InvalidRequestError`` (naming
        ``dimensions``) for more dimensions than the model's hidden size."""
        hidden = self.runner.hidden_size
        if params.dimensions is not None and params.dimensions > hidden:
            raise InvalidRequestError(f"dimensions must be in [1, {hidden}] (the model's hidden size), "
                                      f"got {params.dimensions}", param="dimensions")
        if params.pooling is not None:
            return params
        if self.pooling is None:
            raise EmbeddingsUnsupportedError(f"this model cannot embed: {self.no_pooling_reason}; set a pooling "
                                             "(mean, cls or last) to embed with it", param="pooling")
        return replace(params, pooling=self.pooling)

    def add_request(self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams | PoolingParams,
                    *, grammar: GrammarMatcher | None = None) -> Request:
        """Queue a request (validated: :meth:`check_request`). Its structured-output
        constraint is compiled here (``InvalidGrammarError`` if it does not compile) unless
        ``grammar`` is its matcher, made by :attr:`grammars` beforehand (the async engine
        compiles off the engine thread). An embedding request gets the engine's pooling
        unless it names one (:meth:`pooling_params`). Raises the scheduler's admission errors
        too (a duplicate id, a full queue)."""
        ids = self.check_request(prompt_token_ids, params)
        if isinstance(params, PoolingParams):
            request = Request(request_id=request_id, prompt_token_ids=ids, params=self.pooling_params(params))
            self.scheduler.add_request(request)
            self._live[request_id] = _Live(request, None)
            return request
        if params.structured is None:
            grammar = None
        elif grammar is None:
            grammar = self.grammars.matcher(params.structured)
        request = Request(
            request_id=request_id,
            prompt_token_ids=ids,
            params=params,
            eos_token_ids=self.tokenizer.stop_ids,
            grammar=grammar,
        )
        self.scheduler.add_request(request)
        self._live[request_id] = _Live(request, IncrementalDetokenizer(self.tokenizer, params))
        return request

    def is_live(self, request_id: str) -> bool:
        return self.scheduler.is_live(request_id)

    def abort(self, request_id: str, reason: FinishReason = FinishReason.CANCELLED, error: str | None = None) -> bool:
        """Finish a live request now (client cancel, error); frees its KV blocks before the
        next step. True if it was live; otherwise (unknown, finished already, or finished
        inside a step that then failed) only its engine-side bookkeeping is dropped."""
        live = self.scheduler.is_live(request_id)
        if live:
            self.scheduler.finish_request(request_id, reason, error)
        self._forget(request_id)
        return live

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """One step: schedule, execute (recovering as :mod:`~rocmforge.engine.recovery` says),
        update, detokenize. Raises only what recovery raises (a device at fault, a fatal error)."""
        executed = run_step(self.scheduler, self.runner, self.recovery)
        if executed is None:
            return []
        out, result = executed
        for request_id, (start, entries) in result.prompt_logprobs.items():
            # Entry i is for prompt position start + 1 + i; a recompute after preemption
            # delivers positions again, so overwrite rather than append.
            known = self._live[request_id].prompt_logprobs
            del known[start:]
            known.extend(entries)
        updated = self.scheduler.update(out, result)
        self._advance_grammars(updated)
        return [self._embedding_output(request, result.pooled.get(request.request_id)) if request.is_pooling
                else self._output_or_fail(request, result.logprobs.get(request.request_id)) for request in updated]

    def _advance_grammars(self, updated: list[Request]) -> None:
        """Feed each constrained request its new token; finish it (``stop``) when its output
        is complete, fail it when the grammar broke (the mask allowed only what it accepts,
        so that is a limit the grammar hit, not the model's doing; the refused token is not
        part of the output)."""
        for request in updated:
            grammar = request.grammar
            if grammar is None or request.finish_reason is FinishReason.ERROR or request.is_pooling:
                continue
            rid = request.request_id
            if not grammar.accept(request.output_token_ids[-1]):
                error = f"structured output: {grammar.error}"
                logger.warning("request %s: %s", rid, error, extra={"request_id": rid})
                if request.is_finished:  # by this very token (a stop token, max_tokens)
                    request.finish_reason, request.error = FinishReason.ERROR, error
                else:
                    self.scheduler.finish_request(rid, FinishReason.ERROR, error)
            elif grammar.is_finished and not request.is_finished:
                self.scheduler.finish_request(rid, FinishReason.STOP)

    def _output_or_fail(self, request: Request, logprobs: TokenLogprobs | None) -> RequestOutput:
        """:meth:`_output`; a request whose output cannot be built (its token does not
        detokenize) fails alone with the reason."""
        try:
            return self._output(request, logprobs)
        except Exception as exc:  # one request's data: it fails, the step goes on
            rid = request.request_id
            logger.exception("building the output of request %s failed", rid, extra={"request_id": rid})
            error = f"{type(exc).__name__}: {exc}"
            if self.scheduler.is_live(rid):
                self.scheduler.finish_request(rid, FinishReason.ERROR, error)
            else:
                request.finish_reason, request.error = FinishReason.ERROR, error
            live = self._live.get(rid)
            self._forget(rid)
            return RequestOutput(request_id=rid, new_token_ids=[], delta_text="",
                                 text=live.detokenizer.text if live is not None and live.detokenizer else "",
                                 finished=True,
                                 finish_reason=FinishReason.ERROR.value, error=error,
                                 num_prompt_tokens=request.num_prompt_tokens,
                                 num_output_tokens=request.num_output_tokens)

    def _embedding_output(self, request: Request, embedding: list[float] | None) -> RequestOutput:
        """An embedding request's only output: finished, with its vector (``stop``) or the
        error that ended it."""
        self._forget(request.request_id)
        return RequestOutput(
            request_id=request.request_id, new_token_ids=[], delta_text="", text="", finished=True,
            finish_reason=request.finish_reason.value if request.finish_reason else None, error=request.error,
            num_prompt_tokens=request.num_prompt_tokens, num_cached_tokens=request.num_cached_tokens,
            embedding=embedding if request.finish_reason is FinishReason.STOP else None,
        )

    def _output(self, request: Request, logprobs: TokenLogprobs | None) -> RequestOutput:
        """Detokenize a request's new token, apply stop strings, and package the step's output."""
        live = self._live[request.request_id]
        detokenizer = live.detokenizer
        params = request.params
        if detokenizer is None or not isinstance(params, SamplingParams):
            raise TypeError(f"request {request.request_id} is an embedding request: it has no text")
        # ERROR here means the runner gave it no token this step (Scheduler.update).
        token = None if request.finish_reason is FinishReason.ERROR else request.output_token_ids[-1]
        update = detokenizer.add(token) if token is not None else DetokenizerUpdate("")
        delta = update.delta
        stop_reason: str | int | None = None
        if update.stop is not None:
            stop_reason = update.stop
            if not request.is_finished:
                self.scheduler.finish_request(request.request_id, FinishReason.STOP)
            elif request.finish_reason is FinishReason.LENGTH:
                # The same token hit max_tokens: the text ends at the stop string, say so.
                request.finish_reason = FinishReason.STOP
        elif request.finish_reason is FinishReason.STOP and (
                token in request.eos_token_ids or token in params.stop_token_ids):
            stop_reason = token  # not when a finished grammar ended it
        output = RequestOutput(
            request_id=request.request_id,
            new_token_ids=[token] if token is not None else [],
            delta_text=delta,
            text=detokenizer.text,
            finished=request.is_finished,
            num_prompt_tokens=request.num_prompt_tokens,
            num_output_tokens=request.num_output_tokens,
            num_cached_tokens=request.num_cached_tokens,
            new_logprobs=[logprobs] if logprobs is not None else [],
        )
        if live.prompt_logprobs and request.num_output_tokens == 1:
            output.prompt_logprobs = live.prompt_logprobs
        if request.is_finished:
            output.delta_text += detokenizer.finish()
            output.text = detokenizer.text
            output.finish_reason = request.finish_reason.value if request.finish_reason else None
            output.stop_reason = stop_reason
            output.error = request.error
            self._forget(request.request_id)
        return output

    def _forget(self, request_id: str) -> None:
        self._live.pop(request_id, None)
        self.runner.release(request_id)


def check_token_ids(ids: object, vocab_size: int, param: str, *, allow_empty: bool = False) -> list[int]:
    """``ids`` as a list of ints in ``[0, vocab_size)``; :class:`InvalidRequestError` naming
    ``param`` otherwise (an id out of range would crash the embedding lookup or the
    detokenizer)."""
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise InvalidRequestError(f"{param} must be a list of token ids", param=param)
    result = list(ids)
    if not result and not allow_empty:
        raise InvalidRequestError(f"{param} must not be empty", param=param)
    for token in result:
        if not isinstance(token, int) or isinstance(token, bool):
            raise InvalidRequestError(f"{param} must be a list of token ids", param=param)
        if not 0 <= token < vocab_size:
            raise InvalidRequestError(f"token id {token} in {param} is outside the vocabulary [0, {vocab_size})",
                                      param=param)
    return result
