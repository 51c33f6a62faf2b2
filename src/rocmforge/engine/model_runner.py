"""The model runner: the one owner of device state.

It holds the model's weights (through the model), the paged KV cache (one K and one V tensor
per layer, ``[num_blocks + 1, block_size, num_kv_heads, head_dim]``: the last block is the
scratch block padding rows write to), the decode CUDA graphs with their static buffers
(:mod:`rocmforge.engine.cuda_graphs`) and each seeded request's random generator. Each step
it turns the scheduler's integer plan into tensors, runs the model, samples, and hands back
plain Python values — one host synchronisation per step.

In: :class:`~rocmforge.engine.scheduler.SchedulerOutput`.
Out: :class:`~rocmforge.engine.scheduler.RunnerOutput` (sampled token per sampling request,
its logprobs, and prompt logprobs for requests that asked for them).

Errors at the boundary. torch's device out-of-memory errors (``torch.cuda.OutOfMemoryError``,
and the CPU allocator's ``RuntimeError`` "can't allocate memory") leave :meth:`execute` as
:class:`~rocmforge.errors.DeviceOutOfMemoryError` (the torch error as its cause), after the
allocator's cached blocks are handed back (``torch.cuda.empty_cache()`` on a GPU). An
out-of-memory error, a transient error (:func:`~rocmforge.errors.is_transient`, e.g. a
:class:`~rocmforge.errors.DeviceError`) and a fatal error are raised as they are: the engine
shrinks the batch, retries after a backoff or dies (:mod:`rocmforge.engine.recovery`).

Failure isolation. When a batched step raises anything else, the runner re-runs each request
of the batch alone (the engine also calls :meth:`ModelRunner.execute_isolated` once its
retries of a transient error are spent): requests that succeed alone get their results as
usual, requests that fail alone are reported in ``RunnerOutput.failed`` (the scheduler finishes them with ``error``), so one bad
request does not take its batch-mates down. Re-running is safe: a request's share of the
step writes the same KV slots with the same values (the failed attempt may have written some
of them already), and a request the failed attempt had already sampled for is sampled again
(a seeded request's generator then moves on one draw). If every request fails alone too the
device, not a request, is at fault: the original error is raised and the engine's step-failure
policy applies. A fatal error is raised at once, batched or alone.

Fault injection (tests only, ``ROCMFORGE_FAULT_INJECT``; see
:class:`~rocmforge.settings.FaultInjection`), checked before each forward pass (batched or
alone): a batch holding a request whose id starts with a ``forward_error`` /
``forward_fatal`` prefix raises :class:`~rocmforge.errors.ModelExecutionError` /
:class:`~rocmforge.errors.EngineDeadError`; while ``transient`` passes are left, the pass
raises a :class:`~rocmforge.errors.DeviceError`; a pass over more than ``oom_over`` batched
tokens raises the device's own torch out-of-memory error (so the translation above runs).
"""

from __future__ import annotations

import contextlib
import logging
import re
from typing import TYPE_CHECKING

import torch

from rocmforge.attention import AttentionMetadata
from rocmforge.device import to_device
from rocmforge.engine.cuda_graphs import DecodeGraphs
from rocmforge.engine.sampler import Sampler, SamplingBatch
from rocmforge.engine.scheduler import RunnerOutput, ScheduledRequest, SchedulerOutput
from rocmforge.errors import (
    DeviceError,
    DeviceOutOfMemoryError,
    EngineDeadError,
    ModelExecutionError,
    RocmForgeError,
)
from rocmforge.models.config import ModelConfig
from rocmforge.models.llama import LlamaForCausalLM
from rocmforge.outputs import TokenLogprobs

if TYPE_CHECKING:
    from rocmforge.settings import FaultInjection

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
        faults: FaultInjection | None = None,
        *,
        static_decode: bool = False,
        max_num_seqs: int = 64,
        max_model_len: int | None = None,
    ) -> None:
        """``static_decode``: run decode-only steps at fixed padded shapes through
        :class:`~rocmforge.engine.cuda_graphs.DecodeGraphs` (captured into CUDA graphs by
        :meth:`capture_decode_graphs` on a GPU; eager on the CPU, for tests), for batches of
        up to ``max_num_seqs`` requests and contexts of up to ``max_model_len`` tokens."""
        config = model.config
        self.faults = faults if faults is not None and faults.affects_forward else None
        self._transient_faults_left = faults.transient if faults is not None else 0
        self.model = model
        self.device = device
        self.block_size = block_size
        self.num_blocks = num_blocks
        # One block more than the scheduler hands out: the scratch block padding rows of a
        # static decode step write their K/V to.
        shape = (num_blocks + 1, block_size, config.num_kv_heads, config.head_dim)
        # Zero-filled: masked-out cache entries still enter the attention matmul (weight 0),
        # so they must be finite.
        self.kv_caches = [
            (torch.zeros(shape, dtype=kv_dtype, device=device), torch.zeros(shape, dtype=kv_dtype, device=device))
            for _ in range(config.num_layers)
        ]
        model.bind_kv_cache(self.kv_caches)
        self.sampler = Sampler()
        self._generators: dict[str, torch.Generator] = {}
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
        at load time rather than in the first request. Returns the logits."""
        size = self.block_size
        scratch = self.num_blocks
        metadata = AttentionMetadata.build([size], [size], [[scratch]], size, self.device)
        with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
            hidden = self.model(torch.zeros(size, dtype=torch.int64, device=self.device),
                                torch.arange(size, device=self.device), metadata)
            return self.model.compute_logits(hidden)

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

    def release(self, request_id: str) -> None:
        """Forget a finished request's per-request state (its random generator)."""
        self._generators.pop(request_id, None)

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        """Compute one step. Out-of-memory, transient and fatal errors are raised for the
        engine to handle; any other failure of a batch is isolated request by request (module
        docstring)."""
        try:
            return self._forward(out.scheduled)
        except Exception as exc:
            if isinstance(exc, RocmForgeError) and (exc.is_fatal() or exc.is_transient()
                                                    or isinstance(exc, DeviceOutOfMemoryError)):
                raise
            return self.execute_isolated(out, exc)

    def execute_isolated(self, out: SchedulerOutput, batch_error: Exception) -> RunnerOutput:
        """The batch ``out`` failed with ``batch_error``: re-run each request alone. Requests
        that fail alone too are reported in ``failed``; if all of them do (or the batch held
        one request), ``batch_error`` is raised. A fatal error is raised at once."""
        scheduled = out.scheduled
        if len(scheduled) < 2:
            raise batch_error
        logger.warning("batched step of %d requests failed (%s: %s): running them one at a time",
                       len(scheduled), type(batch_error).__name__, batch_error)
        result = RunnerOutput(sampled={})
        for item in scheduled:
            rid = item.request.request_id
            try:
                alone = self._forward([item])
            except Exception as exc:
                if isinstance(exc, RocmForgeError) and exc.is_fatal():
                    raise
                logger.error("request %s fails on its own: %s: %s", rid, type(exc).__name__, exc,
                             extra={"request_id": rid})
                result.failed[rid] = f"{type(exc).__name__}: {exc}"
                continue
            result.sampled.update(alone.sampled)
            result.logprobs.update(alone.logprobs)
            result.prompt_logprobs.update(alone.prompt_logprobs)
        if len(result.failed) == len(scheduled):
            raise batch_error
        return result

    def free_cached_memory(self) -> None:
        """Hand the allocator's cached, unused device blocks back (a GPU; nothing on the CPU)."""
        if self.device.type != "cuda":
            return
        try:
            torch.cuda.empty_cache()
        except RuntimeError as exc:  # a device in trouble: the retry will tell
            logger.warning("could not empty the CUDA cache: %s", exc)

    def _forward(self, scheduled: list[ScheduledRequest]) -> RunnerOutput:
        """``_execute``, with torch's out-of-memory errors translated (module docstring)."""
        try:
            return self._execute(scheduled)
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

    def _inject_faults(self, scheduled: list[ScheduledRequest]) -> None:
        faults = self.faults
        if faults is None:
            return
        for item in scheduled:
            rid = item.request.request_id
            if any(rid.startswith(prefix) for prefix in faults.forward_fatal):
                raise EngineDeadError(f"injected fatal fault for request {rid!r} (ROCMFORGE_FAULT_INJECT)")
            if any(rid.startswith(prefix) for prefix in faults.forward_error):
                raise ModelExecutionError(f"injected forward fault for request {rid!r} (ROCMFORGE_FAULT_INJECT)")
        if self._transient_faults_left > 0:
            self._transient_faults_left -= 1
            done = faults.transient - self._transient_faults_left
            raise DeviceError(f"injected transient device error {done} of {faults.transient} "
                              "(ROCMFORGE_FAULT_INJECT)", device=str(self.device))
        num_tokens = sum(item.num_tokens for item in scheduled)
        if faults.oom_over is not None and num_tokens > faults.oom_over:
            # What torch itself raises on this device, so the translation in _forward runs.
            what = f"simulated: {num_tokens} batched tokens > oom_over:{faults.oom_over} (ROCMFORGE_FAULT_INJECT)"
            if self.device.type == "cuda":
                raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB ({what})")
            raise RuntimeError(f"DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                               f"2147483648 bytes ({what})")

    @torch.inference_mode()
    def _execute(self, scheduled: list[ScheduledRequest]) -> RunnerOutput:
        # Triton launches on the calling thread's current device (the engine thread's is
        # cuda:0 unless set), so every step names the runner's device.
        with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
            return self._execute_on_device(scheduled)

    def _execute_on_device(self, scheduled: list[ScheduledRequest]) -> RunnerOutput:
        self._inject_faults(scheduled)
        result = RunnerOutput(sampled={})
        if self.decode_graphs is not None and self.decode_graphs.accepts(scheduled):
            self._sample(scheduled, self.decode_graphs.run(scheduled), result)
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
        samplers = [(item, end - 1) for item, end in zip(scheduled, ends) if item.samples]
        if samplers:
            rows = to_device([row for _, row in samplers], self.device)
            self._sample([item for item, _ in samplers], self.model.compute_logits(hidden[rows]), result)
        self._prompt_logprobs(scheduled, ends, hidden, result)
        return result

    def _sample(self, items: list[ScheduledRequest], logits: torch.Tensor, result: RunnerOutput) -> None:
        """Sample one token per row of ``logits`` (row i: ``items[i]``) into ``result``."""
        batch = SamplingBatch(
            params=[item.request.params for item in items],
            prompt_ids=[item.request.prompt_token_ids for item in items],
            output_ids=[item.request.output_token_ids for item in items],
            generators=[self._generator(item) for item in items],
            suppressed=[_suppressed(item) for item in items],
        )
        sampled = self.sampler(logits, batch)
        tokens = sampled.token_ids.tolist()  # the step's host synchronisation
        for item, token in zip(items, tokens):
            result.sampled[item.request.request_id] = token
        if sampled.logprobs is not None and sampled.top_ids is not None:
            values, top_ids = sampled.logprobs.tolist(), sampled.top_ids.tolist()
            for i, (item, token) in enumerate(zip(items, tokens)):
                n = item.request.params.logprobs
                if n is not None:
                    top = list(zip(top_ids[i][:n], values[i][1 : n + 1]))
                    result.logprobs[item.request.request_id] = TokenLogprobs(token, values[i][0], top)

    def _generator(self, item: ScheduledRequest) -> torch.Generator | None:
        seed = item.request.params.seed
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
            top_n = item.request.params.prompt_logprobs
            if top_n is None:
                continue
            request = item.request
            count = min(item.num_tokens, request.num_prompt_tokens - 1 - item.start_pos)
            if count <= 0:
                continue
            first_row = end - item.num_tokens
            logprobs = torch.log_softmax(self.model.compute_logits(hidden[first_row : first_row + count]), dim=-1)
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
    """Stop tokens a request may not draw yet: it has fewer than ``min_tokens`` outputs."""
    request = item.request
    params = request.params
    if request.num_output_tokens >= params.min_tokens:
        return frozenset()
    eos = frozenset() if params.ignore_eos else request.eos_token_ids
    return eos | frozenset(params.stop_token_ids)


def _query_ends(scheduled: list[ScheduledRequest]) -> list[int]:
    """Where each request's tokens end in the flattened batch (host-side, no device read)."""
    ends, total = [], 0
    for item in scheduled:
        total += item.num_tokens
        ends.append(total)
    return ends
