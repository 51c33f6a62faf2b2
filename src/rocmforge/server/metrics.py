"""Prometheus export of the engine's and the HTTP server's statistics (``GET /metrics``).

One :class:`~prometheus_client.CollectorRegistry` per server (:func:`make_registry`), never
the process-wide default one, so one process can hold several servers (the tests do).
Three sources feed it:

* :class:`PrometheusStatsLogger`: the engine thread hands it one
  :class:`~rocmforge.engine.stats.IterationStats` per round of its loop (plain
  dataclasses, :mod:`rocmforge.engine.stats`); it updates counters and histograms.
* :class:`EngineCollector`: gauges read at scrape time from the engine's published
  snapshots (nothing on the hot path), and the build info.
* :class:`HttpMetricsMiddleware`: one count and one duration per HTTP request, labelled by
  the route template (``/status/{request_id}``, not the raw path) to bound cardinality.

Metric names follow the Prometheus conventions: prefix ``rocmforge_``, base units
(seconds), counters end in ``_total``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector
from starlette.routing import Match

from rocmforge import __version__
from rocmforge.engine.request import FinishReason
from rocmforge.engine.stats import IterationStats
from rocmforge.server.middleware import ASGIApp, Message, Receive, Scope, Send
from rocmforge.server.state import ServerState

LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 30.0, 45.0, 60.0,
)
"""Seconds, 1 ms (a GPU decode step) to a minute (a long CPU prefill)."""
REQUEST_LATENCY_BUCKETS = (*LATENCY_BUCKETS, 120.0, 300.0, 600.0)
"""Seconds, for whole requests and their decode phase: long generations run for minutes."""
STRUCTURED_KINDS = ("json", "json_object", "regex", "choice", "grammar")
"""Label values of ``rocmforge_structured_requests_total`` (each exported from the start)."""
UNMATCHED_ROUTE = "unmatched"
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
"""Other methods are counted as ``other`` (clients choose them: the label must stay bounded)."""


def token_buckets(max_value: int) -> tuple[float, ...]:
    """1, 2, 5, 10, 20, 50, ... up to ``max_value`` (token counts of one request)."""
    buckets: list[float] = []
    scale = 1
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * scale
            if value > max_value:
                return tuple(buckets)
            buckets.append(float(value))
        scale *= 10


class PrometheusStatsLogger:
    """Turns the engine's :class:`IterationStats` into counters and histograms.

    Runs on the engine thread; prometheus_client's metrics are thread-safe for the scrape."""

    def __init__(self, registry: CollectorRegistry, max_model_len: int) -> None:
        self.requests = Counter(
            "rocmforge_requests", "Finished requests, by finish reason",
            ["finish_reason"], registry=registry,
        )
        # One child per known reason, so every series exists (at 0) from the start.
        self._requests_by_reason = {r.value: self.requests.labels(r.value) for r in FinishReason}
        self.prompt_tokens = Counter(
            "rocmforge_prompt_tokens", "Prompt tokens served (counted at the request's first token)",
            registry=registry,
        )
        self.generation_tokens = Counter(
            "rocmforge_generation_tokens", "Generated tokens delivered", registry=registry,
        )
        self.embeddings = Counter(
            "rocmforge_embedding_requests", "Embedding requests that delivered their vector", registry=registry,
        )
        self.pooled_tokens = Counter(
            "rocmforge_pooled_tokens", "Prompt tokens pooled into embeddings (also in rocmforge_prompt_tokens)",
            registry=registry,
        )
        self.preemptions = Counter(
            "rocmforge_num_preemptions", "Requests preempted for lack of KV blocks", registry=registry,
        )
        self.prefix_cache_queries = Counter(
            "rocmforge_prefix_cache_queries", "Prompt tokens looked up in the prefix cache", registry=registry,
        )
        self.prefix_cache_hits = Counter(
            "rocmforge_prefix_cache_hits", "Prompt tokens served from the prefix cache", registry=registry,
        )
        self.time_to_first_token = Histogram(
            "rocmforge_time_to_first_token_seconds", "Arrival to first generated token",
            buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.inter_token_latency = Histogram(
            "rocmforge_inter_token_latency_seconds", "Time between two consecutive tokens of a request",
            buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.e2e_latency = Histogram(
            "rocmforge_e2e_request_latency_seconds", "Arrival to finish, finished requests",
            buckets=REQUEST_LATENCY_BUCKETS, registry=registry,
        )
        self.queue_time = Histogram(
            "rocmforge_request_queue_time_seconds", "Arrival to first scheduled",
            buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.prefill_time = Histogram(
            "rocmforge_request_prefill_time_seconds", "First scheduled to first token",
            buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.decode_time = Histogram(
            "rocmforge_request_decode_time_seconds", "First token to finish",
            buckets=REQUEST_LATENCY_BUCKETS, registry=registry,
        )
        self.request_prompt_tokens = Histogram(
            "rocmforge_request_prompt_tokens", "Prompt length of finished requests",
            buckets=token_buckets(max_model_len), registry=registry,
        )
        self.request_generation_tokens = Histogram(
            "rocmforge_request_generation_tokens", "Generated tokens of finished requests",
            buckets=token_buckets(max_model_len), registry=registry,
        )
        self.step_duration = Histogram(
            "rocmforge_engine_step_duration_seconds", "One engine step: schedule, forward, sample, detokenize",
            buckets=LATENCY_BUCKETS, registry=registry,
        )

    def record(self, stats: IterationStats) -> None:
        if stats.num_steps:
            self.step_duration.observe(stats.step_duration_s)
        if stats.num_prompt_tokens:
            self.prompt_tokens.inc(stats.num_prompt_tokens)
        if stats.num_generation_tokens:
            self.generation_tokens.inc(stats.num_generation_tokens)
        if stats.num_embeddings:
            self.embeddings.inc(stats.num_embeddings)
            self.pooled_tokens.inc(stats.num_pooled_tokens)
        if stats.num_preemptions:
            self.preemptions.inc(stats.num_preemptions)
        if stats.prefix_cache_queries:
            self.prefix_cache_queries.inc(stats.prefix_cache_queries)
        if stats.prefix_cache_hits:
            self.prefix_cache_hits.inc(stats.prefix_cache_hits)
        for seconds in stats.time_to_first_tokens:
            self.time_to_first_token.observe(seconds)
        for seconds in stats.inter_token_latencies:
            self.inter_token_latency.observe(seconds)
        for finished in stats.finished_requests:
            counter = self._requests_by_reason.get(finished.finish_reason)
            (counter or self.requests.labels(finished.finish_reason)).inc()
            self.e2e_latency.observe(finished.e2e_s)
            if finished.queue_s is not None:
                self.queue_time.observe(finished.queue_s)
            if finished.prefill_s is not None:
                self.prefill_time.observe(finished.prefill_s)
            if finished.decode_s is not None:
                self.decode_time.observe(finished.decode_s)
            self.request_prompt_tokens.observe(finished.num_prompt_tokens)
            self.request_generation_tokens.observe(finished.num_output_tokens)


class EngineCollector(Collector):
    """Gauges read at scrape time from the engine's snapshots, and the build info."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.build = {
            "version": __version__,
            "model": state.model_name,
            "device": state.engine.device,
        }

    def collect(self) -> Iterator[GaugeMetricFamily | InfoMetricFamily | CounterMetricFamily]:
        engine = self.state.engine
        stats = engine.stats()
        yield InfoMetricFamily("rocmforge_build", "rocmforge version, model and device", value=self.build)
        yield GaugeMetricFamily("rocmforge_requests_running", "Requests being prefilled or decoded",
                                value=stats.num_running)
        yield GaugeMetricFamily("rocmforge_requests_waiting", "Requests in the waiting queue",
                                value=stats.num_waiting)
        yield GaugeMetricFamily("rocmforge_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use",
                                value=stats.kv_cache_usage)
        yield GaugeMetricFamily("rocmforge_engine_alive", "1 while the engine serves requests",
                                value=1.0 if engine.is_alive else 0.0)
        grammars = engine.grammar_stats()
        requests = CounterMetricFamily("rocmforge_structured_requests", "Requests with a structured-output "
                                       "constraint, by kind", labels=["kind"])
        for kind in STRUCTURED_KINDS:
            requests.add_metric([kind], grammars.requests[kind])
        yield requests
        yield CounterMetricFamily("rocmforge_grammar_compiles", "Structured-output constraints compiled "
                                  "(cache misses)", value=grammars.compiles)
        yield CounterMetricFamily("rocmforge_grammar_compile_errors", "Constraints that did not compile",
                                  value=grammars.compile_errors)
        yield CounterMetricFamily("rocmforge_grammar_compile_seconds", "Time spent compiling constraints",
                                  value=grammars.compile_seconds)
        chat = self.state.chat_stats
        parser = self.state.tool_format.name
        calls = CounterMetricFamily("rocmforge_tool_calls", "Tool calls parsed from chat replies",
                                    labels=["parser"])
        calls.add_metric([parser], chat.tool_calls)
        yield calls
        replies = CounterMetricFamily("rocmforge_tool_call_replies", "Chat replies that called tools",
                                      labels=["parser"])
        replies.add_metric([parser], chat.tool_call_replies)
        yield replies
        yield CounterMetricFamily("rocmforge_reasoning_replies", "Chat replies with a reasoning block "
                                  "(reasoning_content)", value=chat.reasoning_replies)


def make_registry(state: ServerState) -> CollectorRegistry:
    """The server's registry: engine gauges, build info, and a :class:`PrometheusStatsLogger`
    attached to ``state.engine`` (HTTP metrics join it with :class:`HttpMetrics`)."""
    registry = CollectorRegistry()
    registry.register(EngineCollector(state))
    state.engine.add_stats_logger(PrometheusStatsLogger(registry, state.engine.max_model_len))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


# --- HTTP ---------------------------------------------------------------------------------------


class HttpMetrics:
    """``rocmforge_http_requests_total`` and ``rocmforge_http_request_duration_seconds``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "rocmforge_http_requests", "HTTP requests answered, by method, route template and status",
            ["method", "route", "status"], registry=registry,
        )
        self.duration = Histogram(
            "rocmforge_http_request_duration_seconds",
            "Request received to response finished (streams included), by method and route template",
            ["method", "route"], buckets=REQUEST_LATENCY_BUCKETS, registry=registry,
        )

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.duration.labels(method, route).observe(seconds)


class HttpMetricsMiddleware:
    """Counts and times every HTTP request. Pure ASGI: messages pass through untouched, so
    streaming responses stream; the duration ends with the last body message (or when the
    app returns, e.g. after a client disconnect). Install it outermost (added last), so it
    also sees the requests that other middleware refuse (401, 413)."""

    def __init__(self, app: ASGIApp, *, metrics: HttpMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # the app raised before starting a response
        done = False

        def finish() -> None:
            nonlocal done
            if not done:
                done = True
                method = scope["method"] if scope["method"] in HTTP_METHODS else "other"
                self.metrics.observe(method, route_template(scope), status, time.perf_counter() - start)

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                finish()

        try:
            await self.app(scope, receive, observed_send)
        finally:
            finish()


def route_template(scope: Scope) -> str:
    """The template of the route that handled (or would handle) the request, path
    converters left out (``/status/{request_id}``); ``unmatched`` for unknown paths.

    The router records its choice in ``scope["route"]`` for API routes. Otherwise (FastAPI's
    docs pages; requests an outer middleware refused before routing: 401, 413) the path is
    matched here against the application's top-level routes. Routes of included routers
    are not top-level in FastAPI's public API, so a request to one of them that was refused
    before routing counts as ``unmatched`` (its ``status`` label tells why)."""
    route = scope.get("route")
    template = getattr(route, "path_format", None)
    if isinstance(template, str):
        return template
    app = scope.get("app")
    for candidate in getattr(app, "routes", ()):
        template = getattr(candidate, "path_format", None)
        if isinstance(template, str):
            match, _ = candidate.matches(scope)
            if match is not Match.NONE:  # PARTIAL: the path is known, the method is not (405)
                return template
    return UNMATCHED_ROUTE
