"""The status board: what the async engine publishes about its requests and its scheduler.

Written by the engine thread only (:class:`~rocmforge.engine.engine_loop.EngineLoop`), after
every command batch and every step; read by anyone (``AsyncEngine.status``, ``/status/{id}``,
the metrics). Snapshots are replaced, never mutated in place (single-key dict writes are
atomic under the GIL), so a reader never blocks and never sees half an update.

Owned here: one :class:`~rocmforge.engine.request_status.RequestStatus` per live request,
the queue positions, the scheduler's stats, and the only history of finished requests —
small status snapshots (no token lists), the most recent ``history`` of them. The scheduler
itself forgets a request the step it finishes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import replace

from rocmforge.engine.request import FinishReason, Request, RequestState
from rocmforge.engine.request_status import RequestStatus, snapshot
from rocmforge.engine.scheduler import Scheduler, SchedulerStats
from rocmforge.errors import ConfigError, RequestNotFoundError

FINISHED_HISTORY = 10_000
"""Finished requests whose status stays queryable (least recently finished dropped first)."""


class StatusBoard:
    def __init__(self, scheduler: Scheduler, history: int = FINISHED_HISTORY) -> None:
        if history < 1:
            raise ConfigError(f"the finished-request history must hold at least 1, got {history}")
        self._history = history
        self._live: dict[str, RequestStatus] = {}
        self._finished: OrderedDict[str, RequestStatus] = OrderedDict()
        self._positions: dict[str, int] = {}
        self._prev_running: set[str] = set()
        self.stats: SchedulerStats = scheduler.get_stats()
        """The scheduler's numbers as of the last publish."""

    # --- readers (any thread) -------------------------------------------------------------

    def status(self, request_id: str) -> RequestStatus:
        """A live or recently finished request's status; unknown (or long forgotten) ids
        raise :class:`RequestNotFoundError`."""
        status = self._live.get(request_id) or self._finished.get(request_id)
        if status is None:
            raise RequestNotFoundError(f"no request with id {request_id!r}")
        if status.state is RequestState.QUEUED:
            status = replace(status, queue_position=self._positions.get(request_id))
        return status

    def knows(self, request_id: str) -> bool:
        return request_id in self._live or request_id in self._finished

    # --- the engine thread ----------------------------------------------------------------

    def admitted(self, request: Request) -> None:
        rid = request.request_id
        self._finished.pop(rid, None)  # a finished id may be reused
        self._live[rid] = snapshot(request)

    def publish(self, scheduler: Scheduler, tracked: Iterable[str]) -> None:
        """Refresh the snapshots of the running requests, of those that left ``running``
        since the last publish (preempted), the queue positions and the stats. Only the
        ``tracked`` requests (the async engine's own) are shown."""
        mine = set(tracked)
        running: set[str] = set()
        for request in scheduler.running:
            rid = request.request_id
            running.add(rid)
            if rid in mine:
                self._live[rid] = snapshot(request)
        for rid in self._prev_running - running:
            if rid in mine and scheduler.is_live(rid):
                self._live[rid] = snapshot(scheduler.get_request(rid))
        self._prev_running = running
        self._positions = {r.request_id: i for i, r in enumerate(scheduler.waiting)} if scheduler.waiting else {}
        self.stats = scheduler.get_stats()

    def finished(self, request: Request, reason: FinishReason | None = None, error: str | None = None) -> RequestStatus:
        """Move a request to the finished history; ``reason`` overrides the request's own when
        they differ (a request that finished inside a failed step is reported as failed, as
        its stream saw). Returns the final status."""
        rid = request.request_id
        status = snapshot(request, error)
        if reason is not None and status.finish_reason != reason.value:
            status = replace(status, finish_reason=reason.value, state=RequestState.FINISHED)
        self._finished[rid] = status
        self._finished.move_to_end(rid)
        self._live.pop(rid, None)
        if len(self._finished) > self._history:
            self._finished.popitem(last=False)
        return status
