"""``rocmforge.LLM``: the offline Python API.

Loads a GGUF file (weights, tokenizer, chat template), builds the engine (scheduler + model
runner) and runs prompts to completion. Many prompts are batched by the same continuous
batching engine the server uses.

    from rocmforge import LLM, SamplingParams
    llm = LLM("model.gguf", device="cpu")
    [out] = llm.generate("The capital of France is", SamplingParams(max_tokens=16, temperature=0))
    [vector] = LLM("model.gguf", pooling="mean").embed("The capital of France")  # EmbeddingOutput

Configuration: keyword arguments are the fields of :mod:`rocmforge.config`'s engine parts
(``device``, ``dtype``, ``block_size``, ``max_num_seqs``, ``kv_cache_memory``...: see
:class:`~rocmforge.config.EngineConfig`), or a whole ``config=EngineConfig(...)``; the same
fields are the ``ROCMFORGE_*`` settings and the CLI flags. Device placement and the GPU -> CPU
fallback of ``device="auto"`` live in :mod:`rocmforge.engine.placement`;
:attr:`LLM.device_fallback` says why it fell back.

A call cleans up after itself: every prompt of a ``generate`` call is validated (tokenized,
ids in the vocabulary, length within the context) before any is queued, and a call that fails
or is interrupted (an exception, Ctrl-C, a ``stream`` abandoned half-way) aborts exactly its
own requests, so the next call finds the engine empty.

Loading logs at INFO (logger ``rocmforge.llm``): the file, its architecture and parameter
count; the device, dtype and weight format; progress at each quarter of the tensors; the load
time and the KV cache (blocks, tokens, bytes).
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from rocmforge.config import EngineConfig
from rocmforge.engine.llm_engine import LLMEngine
from rocmforge.engine.model_runner import kv_block_bytes
from rocmforge.engine.placement import place_model
from rocmforge.engine.scheduler import Scheduler
from rocmforge.errors import ChatTemplateError, ConfigError, InvalidRequestError, ModelExecutionError
from rocmforge.gguf import read_gguf
from rocmforge.hub import resolve_model
from rocmforge.models.loader import ProgressCallback
from rocmforge.models.validate import check_vocabulary, checked_config
from rocmforge.outputs import Completion, EmbeddingOutput, RequestOutput, TokenLogprobs
from rocmforge.pooling_params import PoolingParams, resolve_pooling
from rocmforge.sampling_params import SamplingParams
from rocmforge.settings import SettingsBase, default_models_dir
from rocmforge.testing.fault_spec import FaultInjection
from rocmforge.testing.faulty_runner import inject_faults
from rocmforge.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

Prompt = str | Sequence[int]


class LLM:
    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        *,
        models_dir: str | os.PathLike[str] | None = None,
        config: EngineConfig | None = None,
        progress: ProgressCallback | None = None,
        faults: FaultInjection | None = None,
        **options: Any,
    ) -> None:
        """``model``: a GGUF path, a known model name (``smollm2``) or None for the default.
        ``options``: engine settings by field name (``device="cpu"``, ``dtype="float32"``,
        ``weight_format``, ``block_size``, ``max_num_seqs``, ``kv_cache_memory``... every
        field of :class:`~rocmforge.config.EngineConfig`'s parts, documented there), or
        ``config`` with all of them. ``device="auto"`` takes the GPU when usable (module
        docstring); ``weight_format="auto"`` is ``quantized`` on a GPU, ``dense`` on the CPU.
        ``faults``: a testing aid (``ROCMFORGE_FAULT_INJECT``), None in production."""
        if config is not None and options:
            raise ConfigError(f"give either config or options, not both (got {', '.join(sorted(options))})")
        config = config or EngineConfig.from_kwargs(**options)
        faults = faults or FaultInjection()
        started = time.perf_counter()
        self.path = resolve_model(model, Path(models_dir) if models_dir else default_models_dir())
        gguf = read_gguf(self.path)
        try:
            self.num_parameters = sum(t.n_elements for t in gguf.tensors.values())
            """Parameters in the file's tensors (the model's weights)."""
            logger.info(
                "loading %s: %s, %s parameters, %d tensors, %s on disk", self.path,
                gguf.metadata.get("general.architecture", "unknown architecture"), _count(self.num_parameters),
                len(gguf.tensors), _bytes(self.path.stat().st_size),
            )
            self.metadata: Mapping[str, Any] = gguf.metadata
            tokenizer = config.load.tokenizer
            self.tokenizer = (
                Tokenizer.from_file(tokenizer, gguf.metadata) if tokenizer else Tokenizer.from_gguf_metadata(gguf.metadata)
            )
            # The metadata checked against the tensor index, and an embedding row for every token
            # id, before any weight is placed.
            check_vocabulary(self.tokenizer.vocab_size, checked_config(gguf), self.path)
            placement = place_model(gguf, config, _logging_progress(progress), vocab_size=self.tokenizer.vocab_size,
                                    fail_gpu_init=faults.gpu_init)
        finally:
            gguf.close()
        runner = placement.runner
        inject_faults(runner, faults)
        self.engine_config = config
        """The engine configuration this LLM was built with (as given: ``max_model_len`` may
        be None; :attr:`max_model_len` is the one in force)."""
        self.device = placement.device
        self.dtype = placement.dtype
        self.config = placement.config
        """The model's hyper-parameters (from the GGUF metadata)."""
        self.max_model_len = placement.max_model_len
        self.memory_plan = placement.memory_plan
        """How the device's memory was divided: weights, workspace, KV cache, reserve."""
        self.device_fallback = placement.fallback
        """Why ``device="auto"`` ended up on the CPU although a GPU was wanted; None otherwise."""

        scheduler = Scheduler(replace(config.scheduler, max_model_len=self.max_model_len), config.cache,
                              num_blocks=runner.num_blocks)
        pooling, no_pooling = resolve_pooling(config.pooler.pooling, self.config.pooling_type)
        self.engine = LLMEngine(runner, self.tokenizer, scheduler, pooling=pooling,
                                no_pooling_reason=no_pooling or "")
        self._ids = itertools.count()
        self.load_seconds = time.perf_counter() - started
        """Wall time ``__init__`` took: reading the file, placing the weights, the KV cache."""
        block_size = config.cache.block_size
        kv_bytes = runner.num_blocks * kv_block_bytes(self.config, block_size, self.dtype)
        logger.info(
            "model loaded in %.2f s on %s (%s, %s weights): KV cache %d blocks x %d tokens = %d tokens, %s; "
            "context %d tokens, at most %d running requests", self.load_seconds, self.device,
            str(self.dtype).removeprefix("torch."), placement.weight_format,
            runner.num_blocks, block_size, runner.num_blocks * block_size, _bytes(kv_bytes), self.max_model_len,
            config.scheduler.max_num_seqs,
        )

    @classmethod
    def from_settings(cls, settings: SettingsBase, progress: ProgressCallback | None = None) -> LLM:
        """An LLM configured from :class:`~rocmforge.settings.Settings` (CLI flags + env)."""
        return cls(settings.gguf, models_dir=settings.models, config=settings.engine_config(), progress=progress,
                   faults=settings.faults())

    # --- text <-> tokens ---------------------------------------------------------------

    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        """Token ids of ``text``; special tokens written in the text are parsed."""
        return self.tokenizer.encode(text, add_special=add_special)

    def detokenize(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids))

    # --- generation ----------------------------------------------------------------------

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[Completion]:
        """Complete one prompt or many (a str or a list of token ids each), in input order.
        Every prompt is validated before any runs (module docstring)."""
        prompt_list = _as_prompt_list(prompts)
        if params is None or isinstance(params, SamplingParams):
            param_list = [params or SamplingParams()] * len(prompt_list)
        else:
            param_list = list(params)
            if len(param_list) != len(prompt_list):
                raise InvalidRequestError("need one SamplingParams per prompt", param="params")
        token_lists = [self._prompt_ids(p) for p in prompt_list]
        return self._run(token_lists, param_list)

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Generate for one prompt, yielding each step's output (text deltas) as it comes.
        Leaving the loop early (``break``, an exception, closing the generator) aborts it."""
        params = params or SamplingParams()
        request_id = f"llm-{next(self._ids)}"
        self.engine.add_request(request_id, self._prompt_ids(prompt), params)
        try:
            while True:
                for output in self.engine.step():
                    if output.request_id == request_id:
                        yield output
                        if output.finished:
                            return
        finally:
            if self.engine.is_live(request_id):
                self.engine.abort(request_id)

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        params: SamplingParams | None = None,
        *,
        special_tokens_in_content: bool = False,
        **template_kwargs: Any,
    ) -> Completion:
        """Answer a conversation, rendered with the model's chat template (under its time and
        size budget). Control-token text written in the messages is plain text unless
        ``special_tokens_in_content``: only the template makes control tokens."""
        prompt = self.tokenizer.encode_chat(list(messages), add_generation_prompt=True,
                                            special_tokens_in_content=special_tokens_in_content, **template_kwargs)
        [completion] = self._run([prompt.ids], [params or SamplingParams()])
        return completion

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], **kwargs: Any) -> str:
        template = self.tokenizer.chat_template
        if template is None:
            raise ChatTemplateError("this model has no chat template (tokenizer.chat_template)")
        return template.render(list(messages), add_generation_prompt=True, **kwargs)

    def prompt_logprobs(self, token_ids: Sequence[int], top_k: int = 5) -> list[TokenLogprobs]:
        """For each i: the log-probability of ``token_ids[i+1]`` given ``token_ids[:i+1]``."""
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=top_k)
        [completion] = self._run([list(token_ids)], [params])
        return completion.prompt_logprobs or []

    # --- embeddings ------------------------------------------------------------------------

    def embed(self, prompts: Prompt | Sequence[Prompt], params: PoolingParams | None = None) -> list[EmbeddingOutput]:
        """Embed one prompt or many (a str or a list of token ids each), in input order: each
        prompt's pooled final hidden states (``params.pooling``, else the engine's: the
        ``pooling`` option, by default the model file's ``pooling_type``), truncated to
        ``params.dimensions`` and L2-normalised unless ``params.normalize`` is False. The
        prompts run batched, like ``generate``'s (and are validated first, the same way).
        Text is tokenized as for generation (the tokenizer's BOS added where it adds one)."""
        params = params or PoolingParams()
        ids = [self._prompt_ids(p) for p in _as_prompt_list(prompts)]
        engine = self.engine
        checked = [engine.check_request(prompt, params) for prompt in ids]
        pending = deque((f"llm-{next(self._ids)}", prompt) for prompt in checked)
        order = [request_id for request_id, _ in pending]
        prompt_of = dict(pending)
        finals: dict[str, RequestOutput] = {}
        max_waiting = engine.scheduler.scheduler_config.max_waiting
        try:
            while pending or any(engine.is_live(rid) for rid in order if rid not in finals):
                while pending and engine.scheduler.num_waiting < max_waiting:
                    request_id, prompt = pending.popleft()
                    engine.add_request(request_id, prompt, params)
                for output in engine.step():
                    if output.request_id in prompt_of and output.finished:
                        finals[output.request_id] = output
        finally:
            for request_id in order:
                if engine.is_live(request_id):
                    engine.abort(request_id)
        results = []
        for request_id in order:
            final = finals[request_id]
            if final.embedding is None:
                raise ModelExecutionError(f"embedding request {request_id} failed: {final.error or final.finish_reason}")
            results.append(EmbeddingOutput(request_id=request_id, prompt_token_ids=prompt_of[request_id],
                                           embedding=final.embedding, num_cached_tokens=final.num_cached_tokens))
        return results

    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special=True)
        return list(prompt)

    def _run(self, token_lists: list[list[int]], param_list: list[SamplingParams]) -> list[Completion]:
        """Run the requests to the end. All are validated first; whatever goes wrong (an
        exception, Ctrl-C), the call's own live requests are aborted before it leaves."""
        engine = self.engine
        checked = [engine.check_request(ids, params) for ids, params in zip(token_lists, param_list)]
        pending = deque(zip((f"llm-{next(self._ids)}" for _ in checked), checked, param_list))
        order = [request_id for request_id, _, _ in pending]
        prompts = {request_id: ids for request_id, ids, _ in pending}
        tokens: dict[str, list[int]] = {request_id: [] for request_id in order}
        cached: dict[str, int] = dict.fromkeys(order, 0)
        logprobs: dict[str, list[TokenLogprobs]] = {request_id: [] for request_id in order}
        finals: dict[str, RequestOutput] = {}
        prompt_logprobs: dict[str, list[TokenLogprobs]] = {}
        max_waiting = engine.scheduler.scheduler_config.max_waiting
        try:
            while pending or any(engine.is_live(rid) for rid in order if rid not in finals):
                while pending and engine.scheduler.num_waiting < max_waiting:
                    request_id, ids, params = pending.popleft()
                    engine.add_request(request_id, ids, params)
                for output in engine.step():
                    if output.request_id not in tokens:
                        continue  # another caller's request (a stream left open)
                    tokens[output.request_id].extend(output.new_token_ids)
                    cached[output.request_id] = max(cached[output.request_id], output.num_cached_tokens)
                    logprobs[output.request_id].extend(output.new_logprobs)
                    if output.prompt_logprobs is not None:
                        prompt_logprobs[output.request_id] = output.prompt_logprobs
                    if output.finished:
                        finals[output.request_id] = output
        finally:
            for request_id in order:
                if engine.is_live(request_id):
                    engine.abort(request_id)
        return [
            Completion(
                request_id=request_id,
                prompt_token_ids=prompts[request_id],
                token_ids=tokens[request_id],
                text=finals[request_id].text,
                finish_reason=finals[request_id].finish_reason or "stop",
                logprobs=logprobs[request_id] if params.logprobs is not None else None,
                prompt_logprobs=prompt_logprobs.get(request_id),
                stop_reason=finals[request_id].stop_reason,
                num_cached_tokens=cached[request_id],
            )
            for request_id, params in zip(order, param_list)
        ]


def _logging_progress(progress: ProgressCallback | None) -> ProgressCallback:
    """``progress``, also logging each quarter of the tensors loaded at INFO."""
    logged = [-1]

    def report(done: int, total: int) -> None:
        quarter = 4 * done // total if total > 0 else 4
        if quarter > logged[0]:
            logged[0] = quarter
            if quarter > 0:
                logger.info("loading weights: %d%% (%d of %d tensors)", 25 * quarter, done, total)
        if progress is not None:
            progress(done, total)

    return report


def _count(n: int) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f}{suffix}"
    return str(n)


def _bytes(n: int) -> str:
    for shift, unit in ((30, "GiB"), (20, "MiB"), (10, "KiB")):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} B"


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    items: list[Any] = list(prompts)
    if items and all(_is_id(p) for p in items):
        return [items]  # one prompt given as token ids
    for p in items:
        if not isinstance(p, str) and not (isinstance(p, Sequence) and all(_is_id(t) for t in p)):
            raise InvalidRequestError("a prompt must be a string or a list of token ids", param="prompt")
    return items


def _is_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
