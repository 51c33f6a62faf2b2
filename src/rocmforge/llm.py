"""``rocmforge.LLM``: the offline Python API.

Loads a GGUF file (weights, tokenizer, chat template), builds the engine (scheduler + model
runner) and runs prompts to completion. Many prompts are batched by the same continuous
batching engine the server uses.

    from rocmforge import LLM, SamplingParams
    llm = LLM("model.gguf", device="cpu")
    [out] = llm.generate("The capital of France is", SamplingParams(max_tokens=16, temperature=0))
"""

from __future__ import annotations

import itertools
import logging
import os
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from rocmforge.attention import get_backend
from rocmforge.device import resolve_device, resolve_dtype
from rocmforge.engine.config import CacheConfig, SchedulerConfig
from rocmforge.engine.llm_engine import LLMEngine
from rocmforge.engine.model_runner import ModelRunner, kv_block_bytes
from rocmforge.engine.scheduler import Scheduler
from rocmforge.errors import ChatTemplateError, InvalidRequestError
from rocmforge.gguf import read_gguf
from rocmforge.hub import resolve_model
from rocmforge.models.loader import ProgressCallback, load_model
from rocmforge.outputs import Completion, RequestOutput, TokenLogprobs
from rocmforge.sampling_params import SamplingParams
from rocmforge.settings import Settings, default_models_dir
from rocmforge.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

Prompt = str | Sequence[int]
DEFAULT_CPU_KV_BYTES = 512 << 20
GPU_MEMORY_UTILIZATION = 0.85
DEFAULT_BATCHED_TOKENS = 2048


class LLM:
    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        *,
        tokenizer: str | os.PathLike[str] | None = None,
        device: str = "auto",
        gpu_index: int = 0,
        dtype: str | torch.dtype | None = None,
        weight_format: str = "dense",
        models_dir: str | os.PathLike[str] | None = None,
        kv_cache_memory: int | None = None,
        block_size: int = 16,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = DEFAULT_BATCHED_TOKENS,
        max_waiting: int = 1024,
        max_model_len: int | None = None,
        enable_prefix_caching: bool = True,
        progress: ProgressCallback | None = None,
    ) -> None:
        """``model``: a GGUF path, a known model name (``smollm2``) or None for the default.
        ``weight_format``: ``dense`` (default) dequantizes every weight to ``dtype`` (exact:
        matches HF transformers on the dequantized weights); ``quantized`` keeps 4-bit
        weights packed and the others in int8, with bf16 activations in the matmuls, where
        the device has kernels for it (CPU) — about 2x faster decode, slightly less accurate.
        ``kv_cache_memory``: bytes for the KV cache (default: 512 MiB on the CPU, 85 % of
        the GPU memory left after the weights)."""
        self.path = resolve_model(model, Path(models_dir) if models_dir else default_models_dir())
        self.device = resolve_device(device, gpu_index)
        self.dtype = resolve_dtype(dtype, self.device)
        gguf = read_gguf(self.path)
        self.metadata: Mapping[str, Any] = gguf.metadata
        self.tokenizer = (
            Tokenizer.from_file(tokenizer, gguf.metadata) if tokenizer else Tokenizer.from_gguf_metadata(gguf.metadata)
        )
        loaded = load_model(
            gguf,
            device=self.device,
            dtype=self.dtype,
            attention=get_backend(),
            weight_format=weight_format,
            progress=progress,
        )
        gguf.close()
        self.config = loaded.config

        block_bytes = kv_block_bytes(self.config, block_size, self.dtype)
        context = min(max_model_len or self.config.max_context, self.config.max_context)
        num_blocks = self._num_kv_blocks(kv_cache_memory, block_bytes, max_num_seqs * -(-context // block_size))
        context = min(context, num_blocks * block_size)
        runner = ModelRunner(loaded.model, num_blocks, block_size, self.device, kv_dtype=self.dtype)
        scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=max_num_seqs,
                max_num_batched_tokens=max_num_batched_tokens,
                max_waiting=max_waiting,
                max_model_len=context,
            ),
            CacheConfig(block_size=block_size, num_blocks=num_blocks, enable_prefix_caching=enable_prefix_caching),
        )
        self.engine = LLMEngine(runner, self.tokenizer, scheduler)
        self.max_model_len = context
        self._ids = itertools.count()

    @classmethod
    def from_settings(cls, settings: Settings, progress: ProgressCallback | None = None) -> LLM:
        """An LLM configured from :class:`~rocmforge.settings.Settings` (CLI flags + env)."""
        return cls(
            settings.gguf,
            tokenizer=settings.tokenizer,
            device=settings.device,
            gpu_index=settings.gpu_device,
            dtype=settings.dtype,
            weight_format=settings.weight_format,
            models_dir=settings.models,
            max_num_seqs=settings.max_num_seqs,
            max_num_batched_tokens=max(DEFAULT_BATCHED_TOKENS, settings.max_num_seqs),
            max_waiting=settings.max_waiting,
            max_model_len=settings.max_model_len,
            kv_cache_memory=settings.kv_cache_memory,
            progress=progress,
        )

    def _num_kv_blocks(self, memory: int | None, block_bytes: int, useful_blocks: int) -> int:
        if memory is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                memory = int(free * GPU_MEMORY_UTILIZATION)
            else:
                memory = DEFAULT_CPU_KV_BYTES
        blocks = min(memory // block_bytes, useful_blocks)
        if blocks < 1:
            raise InvalidRequestError(
                f"KV cache memory {memory} bytes is smaller than one block ({block_bytes} bytes)",
                param="kv_cache_memory",
            )
        return blocks

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
        """Complete one prompt or many (a str or a list of token ids each), in input order."""
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
        """Generate for one prompt, yielding each step's output (text deltas) as it comes."""
        request_id = f"llm-{next(self._ids)}"
        self.engine.add_request(request_id, self._prompt_ids(prompt), params or SamplingParams())
        try:
            while True:
                for output in self.engine.step():
                    if output.request_id == request_id:
                        yield output
                        if output.finished:
                            return
        finally:
            if self.engine.scheduler.get_request(request_id).finish_reason is None:
                self.engine.abort(request_id)

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        params: SamplingParams | None = None,
        **template_kwargs: Any,
    ) -> Completion:
        """Answer a conversation, rendered with the model's chat template."""
        prompt = self.apply_chat_template(messages, **template_kwargs)
        [completion] = self._run([self.tokenizer.encode(prompt, add_special=False)], [params or SamplingParams()])
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

    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special=True)
        return list(prompt)

    def _run(self, token_lists: list[list[int]], param_list: list[SamplingParams]) -> list[Completion]:
        engine = self.engine
        pending = deque(zip((f"llm-{next(self._ids)}" for _ in token_lists), token_lists, param_list))
        order = [request_id for request_id, _, _ in pending]
        prompts = {request_id: ids for request_id, ids, _ in pending}
        tokens: dict[str, list[int]] = {request_id: [] for request_id in order}
        logprobs: dict[str, list[TokenLogprobs]] = {request_id: [] for request_id in order}
        finals: dict[str, RequestOutput] = {}
        prompt_logprobs: dict[str, list[TokenLogprobs]] = {}
        max_waiting = engine.scheduler.scheduler_config.max_waiting
        while pending or engine.has_unfinished():
            while pending and engine.scheduler.num_waiting < max_waiting:
                request_id, ids, params = pending.popleft()
                engine.add_request(request_id, ids, params)
            for output in engine.step():
                tokens[output.request_id].extend(output.new_token_ids)
                logprobs[output.request_id].extend(output.new_logprobs)
                if output.prompt_logprobs is not None:
                    prompt_logprobs[output.request_id] = output.prompt_logprobs
                if output.finished:
                    finals[output.request_id] = output
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
            )
            for request_id, params in zip(order, param_list)
        ]


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(p, int) and not isinstance(p, bool) for p in prompts):
        return [prompts]  # one prompt given as token ids
    for p in prompts:
        if not isinstance(p, str) and not (
            isinstance(p, Sequence) and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
        ):
            raise InvalidRequestError("a prompt must be a string or a list of token ids", param="prompt")
    return prompts
