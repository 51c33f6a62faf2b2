"""The model runner: the one owner of device state.

It holds the model's weights (through the model), the paged KV cache (one K and one V tensor
per layer, ``[num_blocks + 1, block_size, num_kv_heads, head_dim]``: the last block is the
scratch block padding rows write to), the decode CUDA graphs with their static buffers
(:mod:`rocmforge.engine.cuda_graphs`), each seeded request's random generator and each
embedding request's pooling state across chunks (:mod:`rocmforge.engine.pooler`). Each step
it turns the scheduler's integer plan into tensors, runs the model, samples, pools, and hands
back plain Python values — one host synchronisation per step (one more when embedding
requests finish in it: their vectors' transfer).

In: :class:`~rocmforge.engine.scheduler.SchedulerOutput`.
Out: :class:`~rocmforge.engine.scheduler.RunnerOutput` (sampled token per sampling request,
its logprobs, prompt logprobs for requests that asked for them, and the pooled vector of
each embedding request the step caught up with its prompt).

Errors at the boundary. torch's device out-of-memory errors (``torch.cuda.OutOfMemoryError``,
and the CPU allocator's ``RuntimeError`` "can't allocate memory") leave :meth:`execute` as
:class:`~rocmforge.errors.DeviceOutOfMemoryError` (the torch error as its cause), after the
allocator's cached blocks are handed back (``torch.cuda.empty_cache()`` on a GPU); every other
exception leaves as it is. What to do about a failed step — shrink it, retry it, re-run its
requests one at a time, probe the device — is the engine's business
(:mod:`rocmforge.engine.recovery`); :meth:`probe` is the runner's part of it: one forward pass
in the scratch block, with no request in it.

Vocabulary: a model's embedding table may have more rows than its tokenizer has tokens
(padding). Only the tokenizer's ids are sampled (``vocab_size``): the logits of padding rows
are cut off, so the detokenizer never meets an id it cannot decode.
"""

from __future__ import annotations

import contextlib
import logging
import math
import mmap
import re
from collections.abc import Iterator
from concurrent import futures

import torch

from rocmforge.attention import AttentionMetadata
from rocmforge.device import to_device
from rocmforge.engine.cuda_graphs import DecodeGraphs
from rocmforge.engine.pooler import Pooler
from rocmforge.engine.sampler import Sampler, SamplingBatch
from rocmforge.engine.scheduler import RunnerOutput, ScheduledRequest, SchedulerOutput
from rocmforge.errors import DeviceOutOfMemoryError, ModelExecutionError
from rocmforge.models.config import ModelConfig
from rocmforge.models.llama import LlamaForCausalLM
from rocmforge.outputs import TokenLogprobs
from rocmforge.sampling_params import MAX_LOGPROBS, SamplingParams
from rocmforge.structured.matcher import MaskFiller

logger = logging.getLogger(__name__)

_OUT_OF_MEMORY = re.compile(r"out of memory|can't allocate memory|cannot allocate memory|failed to allocate",
                            re.IGNORECASE)


def kv_block_bytes(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one KV block takes across all layers (K and V)."""
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * element


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        num_blocks: int,
        block_size: int,
        device: torch.device,
        kv_dtype: torch.dtype,
        *,
        static_decode: bool = False,
        max_num_seqs: int = 64,
        max_model_len: int | None = None,
        vocab_size: int | None = None,
    ) -> None:
        """``static_decode``: run decode-only steps at fixed padded shapes through
        :class:`~rocmforge.engine.cuda_graphs.DecodeGraphs` (captured into CUDA graphs by
        :meth:`capture_decode_graphs` on a GPU; eager on the CPU, for tests), for batches of
        up to ``max_num_seqs`` requests and contexts of up to ``max_model_len`` tokens.
        ``vocab_size``: the ids that may be sampled (the tokenizer's; default: every
        embedding row)."""
        config = model.config
        self.vocab_size = min(vocab_size or config.vocab_size, config.vocab_size)
        """Ids ``[0, vocab_size)`` may be sampled; logits of padding rows beyond are cut off."""
        self.model = model
        self.device = device
        self.block_size = block_size
        self.num_blocks = num_blocks
        # One block more than the scheduler hands out: the scratch block padding rows of a
        # static decode step write their K/V to.
        shape = (num_blocks + 1, block_size, config.num_kv_heads, config.head_dim)
        # Zero-filled: masked-out cache entries still enter the attention matmul (weight 0),
        # so they must be finite.
        self.kv_caches = [(_zeros(shape, kv_dtype, device), _zeros(shape, kv_dtype, device))
                          for _ in range(config.num_layers)]
        model.bind_kv_cache(self.kv_caches)
        self.sampler = Sampler()
        self.masks = MaskFiller()
        """The structured-output bitmask of each step, computed while the forward pass runs."""
        self._generators: dict[str, torch.Generator] = {}
        self.pooler = Pooler()
        """Embedding requests' pooling, and its state across chunked-prefill steps."""
        self.decode_graphs = DecodeGraphs(
            model, device=device, block_size=block_size, max_num_seqs=max_num_seqs,
            max_model_len=max_model_len or config.max_context, scratch_slot=num_blocks * block_size,
        ) if static_decode else None
        logger.info(
            "KV cache: %d blocks of %d tokens (%.1f MiB, %s)",
            num_blocks,
            block_size,
            num_blocks * kv_block_bytes(config, block_size, kv_dtype) / 2**20,
            kv_dtype,
        )

    @torch.inference_mode()
    def warm_up(self) -> torch.Tensor:
        """Run one prefill of ``block_size`` dummy tokens through the model and its head, in
        the scratch block (no request's KV is touched). On a GPU this compiles the Triton
        kernels at start-up and turns a kernel that cannot run on this device into an error
        at load time rather than in the first request. Returns the logits.

        Also the engine's device probe (:meth:`probe`): a pass with no request in it."""
        size = self.block_size
        scratch = self.num_blocks
        metadata = AttentionMetadata.build([size], [size], [[scratch]], size, self.device)
        with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
            hidden = self.model(torch.zeros(size, dtype=torch.int64, device=self.device),
                                torch.arange(size, device=self.device), metadata)
            return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def profile_step(self, num_tokens: int, num_seqs: int) -> None:
        """The largest step this runner will run, on dummy data, for the memory profile: a
        prefill of ``num_tokens`` tokens (one sequence over blocks ``0 ..``: the pool must
        hold them; a profiling runner is discarded afterwards), sampling ``num_seqs`` rows with
        every filter, penalty, grammar mask and logprob on, prompt logprobs over the whole chunk, and the
        largest padded decode step when decode runs at static shapes."""
        size = self.block_size
        blocks = -(-num_tokens // size)
        if blocks > self.num_blocks:
            raise ValueError(f"profiling {num_tokens} tokens needs {blocks} blocks, the pool has {self.num_blocks}")
        metadata = AttentionMetadata.build([num_tokens], [num_tokens], [list(range(blocks))], size, self.device)
        with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
            hidden = self.model(torch.zeros(num_tokens, dtype=torch.int64, device=self.device),
                                torch.arange(num_tokens, device=self.device), metadata)
            chunk = self.model.compute_logits(hidden)[:, : self.vocab_size]
            torch.log_softmax(chunk, dim=-1)  # prompt logprobs of a whole chunk
            del chunk
            rows = min(num_seqs, num_tokens)
            params = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, min_p=0.05, repetition_penalty=1.1,
                                    presence_penalty=0.5, frequency_penalty=0.5, logprobs=MAX_LOGPROBS)
            batch = SamplingBatch(params=[params] * rows, prompt_ids=[[0]] * rows, output_ids=[[0]] * rows,
                                  generators=[None] * rows, suppressed=[frozenset()] * rows,
                                  allowed=torch.full((rows, -(-self.vocab_size // 32)), -1, dtype=torch.int32))
            self.sampler(self.model.compute_logits(hidden[:rows])[:, : self.vocab_size], batch)
            if self.decode_graphs is not None:
                self.decode_graphs.profile()

    def measure_workspace(self, num_tokens: int, num_seqs: int) -> int:
        """Peak bytes a step allocates beyond what is allocated now (weights, KV pool), as
        the CUDA allocator measured it over :meth:`profile_step` (a GPU only)."""
        if self.device.type != "cuda":
            raise ValueError("measure_workspace needs a GPU: the CPU plans with the estimate")
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        baseline = torch.cuda.memory_allocated(self.device)
        self.profile_step(num_tokens, num_seqs)
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device) - baseline

    def capture_decode_graphs(self) -> None:
        """Capture the static decode step's CUDA graphs (a GPU with ``static_decode``). If
        capture fails, decode steps run eagerly (logged): slower, not wrong."""
        if self.decode_graphs is None:
            return
        try:
            self.decode_graphs.capture()
        except (RuntimeError, AssertionError) as exc:  # torch / Triton capture errors
            if is_out_of_memory(exc):
                self.free_cached_memory()
            logger.warning("capturing the decode CUDA graphs failed (%s: %s): decode steps run eagerly",
                           type(exc).__name__, exc)
            self.decode_graphs = None

    @property
    def hidden_size(self) -> int:
        """Length of a pooled embedding before truncation."""
        return self.model.config.hidden_size

    def release(self, request_id: str) -> None:
        """Forget a finished request's per-request state (its random generator, its pooling)."""
        self._generators.pop(request_id, None)
        self.pooler.release(request_id)

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        """Compute one step. torch's out-of-memory errors leave as
        :class:`DeviceOutOfMemoryError`, anything else as it is (module docstring)."""
        with self.device_errors(out.scheduled):
            return self._execute(out.scheduled)

    def probe(self) -> None:
        """One forward pass with no request in it (the scratch block only), synchronised:
        raises when the device itself fails. The engine calls it when every request of a step
        failed on its own, to tell a broken device from bad requests."""
        with self.device_errors([]):
            logits = self.warm_up()
            if not bool(torch.isfinite(logits).all()):
                raise ModelExecutionError(f"the device probe on {self.device} produced non-finite logits")

    @contextlib.contextmanager
    def device_errors(self, scheduled: list[ScheduledRequest]) -> Iterator[None]:
        """Translate torch's out-of-memory errors raised inside into :class:`DeviceOutOfMemoryError`
        (after handing the allocator's cached blocks back), naming the step's size."""
        try:
            yield
        except RuntimeError as exc:  # torch.cuda.OutOfMemoryError is one too
            if not is_out_of_memory(exc):
                raise
            self.free_cached_memory()
            detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            num_tokens = sum(item.num_tokens for item in scheduled)
            raise DeviceOutOfMemoryError(
                f"out of memory on {self.device} running a step of {len(scheduled)} requests "
                f"({num_tokens} tokens): {detail}",
                device=str(self.device), num_requests=len(scheduled), num_tokens=num_tokens,
            ) from exc

    def free_cached_memory(self) -> None:
        """Hand the allocator's cached, unused device blocks back (a GPU; nothing on the CPU)."""
        if self.device.type != "cuda":
            return
        try:
            torch.cuda.empty_cache()
        except RuntimeError as exc:  # a device in trouble: the retry will tell
            logger.warning("could not empty the CUDA cache: %s", exc)

    @torch.inference_mode()
    def _execute(self, scheduled: list[ScheduledRequest]) -> RunnerOutput:
        # Triton launches on the calling thread's current device (the engine thread's is
        # cuda:0 unless set), so every step names the runner's device.
        with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
            return self._execute_on_device(scheduled)

    def _execute_on_device(self, scheduled: list[ScheduledRequest]) -> RunnerOutput:
        # The rows that sample are known before the forward pass: their grammar masks are
        # computed meanwhile, on the mask thread; no step ends while one is still in work.
        pending = self.masks.start([item.request.grammar for item in scheduled if _samples(item)])
        try:
            return self._forward_and_sample(scheduled, pending)
        finally:
            if pending is not None:
                futures.wait([pending])

    def _forward_and_sample(self, scheduled: list[ScheduledRequest],
                            pending: futures.Future[torch.Tensor] | None) -> RunnerOutput:
        result = RunnerOutput(sampled={})
        if self.decode_graphs is not None and self.decode_graphs.accepts(scheduled):
            self._sample(scheduled, self.decode_graphs.run(scheduled), result, pending)
            return result
        input_ids: list[int] = []
        positions: list[int] = []
        for item in scheduled:
            input_ids.extend(item.token_ids)
            positions.extend(range(item.start_pos, item.start_pos + item.num_tokens))
        metadata = AttentionMetadata.build(
            query_lens=[item.num_tokens for item in scheduled],
            seq_lens=[item.start_pos + item.num_tokens for item in scheduled],
            block_tables=[item.request.block_ids for item in scheduled],
            block_size=self.block_size,
            device=self.device,
        )
        hidden = self.model(
            to_device(input_ids, self.device, torch.int64),
            to_device(positions, self.device, torch.int64),
            metadata,
        )
        ends = _query_ends(scheduled)
        samplers = [(item, end - 1) for item, end in zip(scheduled, ends) if _samples(item)]
        if samplers:
            rows = to_device([row for _, row in samplers], self.device)
            self._sample([item for item, _ in samplers], self.model.compute_logits(hidden[rows]), result, pending)
        self._prompt_logprobs(scheduled, ends, hidden, result)
        poolers = [(item, end - item.num_tokens) for item, end in zip(scheduled, ends) if item.request.is_pooling]
        if poolers:
            pooling = self.pooler.pool(poolers, hidden)
            self.pooler.commit(pooling)  # last: nothing of the step can fail after this
            result.pooled.update(pooling.vectors)
        return result

    def _sample(self, items: list[ScheduledRequest], logits: torch.Tensor, result: RunnerOutput,
                pending: futures.Future[torch.Tensor] | None) -> None:
        """Sample one token per row of ``logits`` (row i: ``items[i]``, whose grammar mask,
        if any row has one, ``pending`` is computing) into ``result``."""
        if logits.shape[-1] != self.vocab_size:
            logits = logits[:, : self.vocab_size]
        batch = SamplingBatch(
            params=[_sampling_params(item) for item in items],
            prompt_ids=[item.request.prompt_token_ids for item in items],
            output_ids=[item.request.output_token_ids for item in items],
            generators=[self._generator(item) for item in items],
            suppressed=[_suppressed(item) for item in items],
            allowed=pending.result() if pending is not None else None,
        )
        sampled = self.sampler(logits, batch)
        tokens = sampled.token_ids.tolist()  # the step's host synchronisation
        for item, token in zip(items, tokens):
            result.sampled[item.request.request_id] = token
        if sampled.logprobs is not None and sampled.top_ids is not None:
            values, top_ids = sampled.logprobs.tolist(), sampled.top_ids.tolist()
            for i, (item, token) in enumerate(zip(items, tokens)):
                n = _sampling_params(item).logprobs
                if n is not None:
                    top = list(zip(top_ids[i][:n], values[i][1 : n + 1]))
                    result.logprobs[item.request.request_id] = TokenLogprobs(token, values[i][0], top)

    def _generator(self, item: ScheduledRequest) -> torch.Generator | None:
        seed = _sampling_params(item).seed
        if seed is None:
            return None
        request_id = item.request.request_id
        generator = self._generators.get(request_id)
        if generator is None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
            self._generators[request_id] = generator
        return generator

    def _prompt_logprobs(
        self,
        scheduled: list[ScheduledRequest],
        ends: list[int],
        hidden: torch.Tensor,
        result: RunnerOutput,
    ) -> None:
        """Row r of a chunk predicts token start_pos + r + 1; keep those inside the prompt."""
        for item, end in zip(scheduled, ends):
            params = item.request.params
            top_n = params.prompt_logprobs if isinstance(params, SamplingParams) else None
            if top_n is None:
                continue
            request = item.request
            count = min(item.num_tokens, request.num_prompt_tokens - 1 - item.start_pos)
            if count <= 0:
                continue
            first_row = end - item.num_tokens
            logits = self.model.compute_logits(hidden[first_row : first_row + count])[:, : self.vocab_size]
            logprobs = torch.log_softmax(logits, dim=-1)
            targets = request.prompt_token_ids[item.start_pos + 1 : item.start_pos + 1 + count]
            chosen = logprobs.gather(1, to_device(targets, self.device)[:, None])[:, 0].tolist()
            entries: list[TokenLogprobs] = []
            if top_n:
                top_values, top_ids = (t.tolist() for t in logprobs.topk(top_n, dim=-1))
            for r, target in enumerate(targets):
                top = list(zip(top_ids[r], top_values[r])) if top_n else []
                entries.append(TokenLogprobs(target, chosen[r], top))
            result.prompt_logprobs[request.request_id] = (item.start_pos, entries)


def is_out_of_memory(exc: BaseException) -> bool:
    """torch ran out of device memory: the CUDA/ROCm error class, or an allocator message."""
    return isinstance(exc, torch.cuda.OutOfMemoryError) or bool(_OUT_OF_MEMORY.search(str(exc)))


def _suppressed(item: ScheduledRequest) -> frozenset[int]:
    """Stop tokens a request may not draw yet: it has fewer than ``min_tokens`` outputs (a
    constrained request's grammar says when it may end instead)."""
    request = item.request
    params = _sampling_params(item)
    if request.num_output_tokens >= params.min_tokens or request.grammar is not None:
        return frozenset()
    eos = frozenset() if params.ignore_eos else request.eos_token_ids
    return eos | frozenset(params.stop_token_ids)


def _samples(item: ScheduledRequest) -> bool:
    """The step samples a token for it (caught up, and a generation request)."""
    return item.samples and not item.request.is_pooling


def _sampling_params(item: ScheduledRequest) -> SamplingParams:
    """A sampling row's parameters (only generation requests are given rows)."""
    params = item.request.params
    if not isinstance(params, SamplingParams):
        raise TypeError(f"request {item.request.request_id} is an embedding request: it does not sample")
    return params


def _query_ends(scheduled: list[ScheduledRequest]) -> list[int]:
    """Where each request's tokens end in the flattened batch (host-side, no device read)."""
    ends, total = [], 0
    for item in scheduled:
        total += item.num_tokens
        ends.append(total)
    return ends


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero-filled KV tensor. On the CPU an anonymous mapping: the kernel hands out zero
    pages, and a page becomes resident only when a token's K/V is first written to it, so
    an idle pool costs no RAM (``torch.zeros`` would touch every page up front)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return torch.frombuffer(mmap.mmap(-1, max(nbytes, 1)), dtype=torch.uint8)[:nbytes].view(dtype).view(shape)
