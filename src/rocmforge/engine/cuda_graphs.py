"""Decode steps at fixed shapes, replayed from CUDA graphs on a GPU.

A decode step (every scheduled request adds exactly one token and samples) launches a few
hundred small kernels; at small batch sizes the GPU would mostly wait for Python to launch
them. :class:`DecodeGraphs` captures the whole forward pass plus the logits projection once
per batch size of :func:`capture_sizes` and replays it: one launch per step.

In: a decode-only list of :class:`~rocmforge.engine.scheduler.ScheduledRequest`.
Out: fp32 logits ``[n, vocab]``, row i for request i (the sampler runs outside the graph).

Owned here: the static device buffers the graphs read (token ids, positions, KV slots,
block tables, context lengths) and the graphs with their outputs. The model runner owns
this object, as it owns every device tensor.

Padding. A step of n requests replays the graph of the smallest captured size ``bs >= n``;
rows n .. bs-1 are padding::

    row        0 .. n-1               n .. bs-1
    token id   the request's token    0
    position   start_pos              0
    KV slot    from its block table   scratch_slot (a spare block no request owns)
    seq_len    start_pos + 1          0        -> attention reads no key: output 0
    table row  its block ids, 0s      0s

The attention backend must therefore take its grid from host constants only: the step's
``max_seq_len`` is the model's context length, not the longest sequence of the step.

On the CPU (tests) the same padded static-shape step runs eagerly — there is no graph to
capture — so padding and buffer handling are checked without a GPU.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from rocmforge.attention import AttentionMetadata
from rocmforge.engine.scheduler import ScheduledRequest
from rocmforge.models.llama import LlamaForCausalLM
from rocmforge.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Batch sizes with a graph: 1, 2, 4, 8, then every 16 up to ``max_num_seqs`` (always
    included). A step pads to the next size: at most 15 wasted rows past 16."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_num_seqs]
    sizes += list(range(16, max_num_seqs, 16))
    sizes.append(max_num_seqs)
    return sorted(set(sizes))


class DecodeGraphs:
    def __init__(
        self,
        model: LlamaForCausalLM,
        *,
        device: torch.device,
        block_size: int,
        max_num_seqs: int,
        max_model_len: int,
        scratch_slot: int,
    ) -> None:
        self.model = model
        self.device = device
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.scratch_slot = scratch_slot
        self.sizes = capture_sizes(max_num_seqs)
        self.max_batch = self.sizes[-1]
        self.table_width = -(-max_model_len // block_size)
        self.use_graphs = device.type == "cuda"
        n = self.max_batch
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), scratch_slot, dtype=torch.int64, device=device)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, self.table_width, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int64, device=device)
        self.token_query_pos = torch.zeros(n, dtype=torch.int64, device=device)
        # Host staging: one row per sequence, [id, position, slot, seq_len | block table].
        self._staging = torch.zeros(n, 4 + self.table_width, dtype=torch.int64,
                                    pin_memory=self.use_graphs and torch.cuda.is_available())
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def accepts(self, scheduled: list[ScheduledRequest]) -> bool:
        """A decode-only step this object can run: one new token per request, every request
        samples, none asks for prompt logprobs or pools (they need hidden states the graph
        does not keep), and the batch fits the largest captured size."""
        if not scheduled or len(scheduled) > self.max_batch:
            return False
        return all(
            item.num_tokens == 1 and item.samples and isinstance(item.request.params, SamplingParams)
            and item.request.params.prompt_logprobs is None and item.start_pos < self.max_model_len
            for item in scheduled
        )

    def capture(self) -> None:
        """Capture one graph per size, largest first, sharing one memory pool (a step replays
        one graph and its logits are consumed before the next replay). Eager on the CPU."""
        if not self.use_graphs:
            return
        started = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        with torch.inference_mode(), torch.cuda.device(self.device):
            for size in reversed(self.sizes):
                metadata = self._metadata(size)
                self._forward(size, metadata)  # compiles and autotunes the kernels outside the capture
                torch.cuda.synchronize(self.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits = self._forward(size, metadata)
                self._graphs[size] = (graph, logits)
        torch.cuda.synchronize(self.device)
        logger.info("captured decode CUDA graphs for batch sizes %s in %.1f s",
                    ",".join(map(str, self.sizes)), time.perf_counter() - started)

    def profile(self) -> torch.Tensor:
        """Run the largest padded step once, eagerly, all rows padding (nothing but the
        scratch slot is written): what a decode step allocates at its worst, for the memory
        profile. Returns its logits."""
        with torch.inference_mode():
            for buffer in (self.input_ids, self.positions, self.seq_lens, self.block_tables):
                buffer.zero_()
            self.slot_mapping.fill_(self.scratch_slot)
            return self._forward(self.max_batch, self._metadata(self.max_batch))

    def run(self, scheduled: list[ScheduledRequest]) -> torch.Tensor:
        """Logits ``[n, vocab]`` of a step :meth:`accepts` took. The result is a view of
        the graph's output: read it before the next call."""
        n = len(scheduled)
        size = next(s for s in self.sizes if s >= n)
        self._stage(scheduled, size)
        if self.use_graphs:
            graph, logits = self._graphs[size]
            graph.replay()
            return logits[:n]
        return self._forward(size, self._metadata(size))[:n]

    def _stage(self, scheduled: list[ScheduledRequest], size: int) -> None:
        """Copy the step's integers into the static buffers (one host->device copy). The
        pinned staging buffer is reused: the previous step's copy is complete, since the
        runner synchronises once per step (reading the sampled tokens) before this runs."""
        staging = self._staging[:size]
        host = staging.numpy()
        host[:] = 0
        host[:, 2] = self.scratch_slot
        block_size = self.block_size
        for row, item in enumerate(scheduled):
            pos = item.start_pos
            table = item.request.block_ids
            host[row, 0] = item.request.all_token_ids[pos]
            host[row, 1] = pos
            host[row, 2] = table[pos // block_size] * block_size + pos % block_size
            host[row, 3] = pos + 1
            host[row, 4 : 4 + len(table)] = np.asarray(table, dtype=np.int64)
        device_rows = staging.to(self.device, non_blocking=True)
        self.input_ids[:size].copy_(device_rows[:, 0])
        self.positions[:size].copy_(device_rows[:, 1])
        self.slot_mapping[:size].copy_(device_rows[:, 2])
        self.seq_lens[:size].copy_(device_rows[:, 3])
        self.block_tables[:size].copy_(device_rows[:, 4:])

    def _metadata(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:size],
            block_tables=self.block_tables[:size],
            seq_lens=self.seq_lens[:size],
            query_start_loc=self.query_start_loc[: size + 1],
            token_seq=self.query_start_loc[:size],
            token_query_pos=self.token_query_pos[:size],
            max_query_len=1,
            max_seq_len=self.max_model_len,
            block_size=self.block_size,
        )

    def _forward(self, size: int, metadata: AttentionMetadata) -> torch.Tensor:
        hidden = self.model(self.input_ids[:size], self.positions[:size], metadata)
        return self.model.compute_logits(hidden)
