"""Prometheus exposition of the engine's state (a basic set; read at scrape time).

Stats are plain dataclasses owned by the engine (:class:`SchedulerStats`); this module only
turns the latest snapshot into Prometheus metric families, so nothing is updated on the hot
path.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from rocmforge import __version__
from rocmforge.server.state import ServerState


class EngineCollector(Collector):
    def __init__(self, state: ServerState) -> None:
        self.state = state

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily | InfoMetricFamily]:
        engine = self.state.engine
        stats = engine.stats()
        yield InfoMetricFamily("rocmforge_build", "rocmforge build and model", value={
            "version": __version__, "model": self.state.config.model_name})
        yield GaugeMetricFamily("rocmforge_requests_running", "Requests being prefilled or decoded", value=stats.num_running)
        yield GaugeMetricFamily("rocmforge_requests_waiting", "Requests in the waiting queue", value=stats.num_waiting)
        yield GaugeMetricFamily("rocmforge_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use",
                                value=stats.kv_cache_usage)
        yield CounterMetricFamily("rocmforge_preemptions", "Requests preempted for lack of KV blocks",
                                  value=stats.num_preemptions)
        yield CounterMetricFamily("rocmforge_prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                  value=stats.prefix_cache_queries)
        yield CounterMetricFamily("rocmforge_prefix_cache_hits", "Prompt tokens served from the prefix cache",
                                  value=stats.prefix_cache_hits)
        yield GaugeMetricFamily("rocmforge_engine_alive", "1 while the engine serves requests",
                                value=1.0 if engine.is_alive else 0.0)


def make_registry(state: ServerState) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(EngineCollector(state))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
