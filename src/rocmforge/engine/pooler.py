"""Pooling of embedding requests: final hidden states in, one vector per finished prompt out.

In: each step's embedding requests (their :class:`~rocmforge.engine.scheduler.ScheduledRequest`
and where their chunk's rows start in the step's hidden states ``[T, hidden]``, the model's
output after the final norm, before the LM head). Out: for the requests the step catches up
with their prompt, the pooled vector, truncated to ``dimensions`` and L2-normalised as their
:class:`~rocmforge.pooling_params.PoolingParams` say, as fp32 values on the host.

Chunked prefill: a prompt computed over several steps pools across them. ``mean`` keeps the
fp32 sum of the rows so far, ``cls`` the first row, per request (device tensors, owned here,
dropped by :meth:`Pooler.release`); ``last`` needs only the final chunk's last row. A chunk
that starts at position 0 starts afresh (a first chunk, or a recompute after preemption).
These requests take no prefix-cache hits, so their first chunk always starts at 0.

A step that fails must leave no trace (recovery runs it again, or its requests one by one):
:meth:`Pooler.pool` computes without changing anything; the runner applies the result with
:meth:`Pooler.commit` once the whole step has succeeded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from rocmforge.engine.scheduler import ScheduledRequest
from rocmforge.errors import ModelExecutionError
from rocmforge.pooling_params import PoolingParams


@dataclass(slots=True)
class _Partial:
    """What a request's earlier chunks contributed: positions ``[0, num_tokens)``."""

    value: torch.Tensor
    """[hidden] fp32: the sum of their rows (``mean``) or the first row (``cls``)."""
    num_tokens: int


@dataclass(slots=True)
class PoolingStep:
    """One step's pooling, computed but not yet applied (:meth:`Pooler.commit`)."""

    partials: dict[str, _Partial] = field(default_factory=dict)
    """Requests with more chunks to come: their state after this step."""
    vectors: dict[str, list[float]] = field(default_factory=dict)
    """Requests caught up with their prompt: the finished embedding."""


class Pooler:
    """The model runner's pooling: per-request state between chunks (module docstring)."""

    def __init__(self) -> None:
        self._partials: dict[str, _Partial] = {}

    def pool(self, items: list[tuple[ScheduledRequest, int]], hidden: torch.Tensor) -> PoolingStep:
        """Pool ``items`` (each an embedding request's share of the step and the row its chunk
        starts at in ``hidden``). Finished vectors reach the host in one transfer."""
        step = PoolingStep()
        finished: list[tuple[str, torch.Tensor]] = []
        for item, first_row in items:
            request = item.request
            params = request.params
            if not isinstance(params, PoolingParams) or params.pooling is None:
                raise ModelExecutionError(f"request {request.request_id} has no pooling to pool with")
            rows = hidden[first_row : first_row + item.num_tokens]
            if params.pooling == "last":
                if item.samples:
                    finished.append((request.request_id, _finish(rows[-1].float(), params)))
                continue
            partial = self._continued(item)
            if params.pooling == "cls":
                value = rows[0].float().clone() if partial is None else partial.value  # no view into hidden
            else:
                chunk_sum = rows.float().sum(dim=0)
                value = chunk_sum if partial is None else partial.value + chunk_sum
            covered = item.start_pos + item.num_tokens
            if item.samples:
                pooled = value / covered if params.pooling == "mean" else value
                finished.append((request.request_id, _finish(pooled, params)))
            else:
                step.partials[request.request_id] = _Partial(value, covered)
        if finished:
            flat = torch.cat([vector for _, vector in finished]).cpu().tolist()  # the one transfer
            offset = 0
            for request_id, vector in finished:
                step.vectors[request_id] = flat[offset : offset + vector.shape[0]]
                offset += vector.shape[0]
        return step

    def commit(self, step: PoolingStep) -> None:
        """Apply a step that succeeded: keep its partial states, drop the finished ones'."""
        self._partials.update(step.partials)
        for request_id in step.vectors:
            self._partials.pop(request_id, None)

    @property
    def num_pending(self) -> int:
        """Requests with pooling state kept between chunks."""
        return len(self._partials)

    def release(self, request_id: str) -> None:
        """Forget a finished (or cancelled) request's partial state."""
        self._partials.pop(request_id, None)

    def _continued(self, item: ScheduledRequest) -> _Partial | None:
        """The state the chunk continues: None for a chunk at position 0; else the earlier
        chunks' (they must cover exactly the positions before it)."""
        if item.start_pos == 0:
            return None
        partial = self._partials.get(item.request.request_id)
        if partial is None or partial.num_tokens != item.start_pos:
            covered = 0 if partial is None else partial.num_tokens
            raise ModelExecutionError(
                f"request {item.request.request_id}: a chunk at position {item.start_pos} follows pooled "
                f"positions [0, {covered})"
            )
        return partial


def _finish(vector: torch.Tensor, params: PoolingParams) -> torch.Tensor:
    """Matryoshka truncation to ``dimensions``, then L2 normalisation (``normalize``)."""
    if params.dimensions is not None:
        vector = vector[: params.dimensions]
    if params.normalize:
        vector = F.normalize(vector, dim=0)
    return vector
