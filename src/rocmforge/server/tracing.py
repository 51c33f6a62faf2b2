"""OpenTelemetry traces of the request lifecycle, exported over OTLP; off unless configured.

Flows in: the settings' OTLP switch (:func:`tracing_from_settings`) or, in tests, any
:class:`SpanExporter` (:func:`setup_tracing`); then, per HTTP request, the ASGI scope and
response messages (from :class:`~rocmforge.server.middleware.RequestContextMiddleware`)
and the engine's :class:`~rocmforge.engine.async_engine.RequestStatus` of every request
the route submitted. Flows out: spans to the exporter (batched, on the SDK's own thread)::

    POST /generate          SERVER  request received → last response byte (streams included)
    └── llm.request                 engine request: arrival → finished  (one per choice)
        ├── queue                   arrival → first scheduled
        ├── prefill                 first scheduled → first token (recompute after a
        │                           preemption before the first token included)
        └── decode                  first token → finished

HTTP span attributes: ``http.request.method``, ``http.route`` (the route template, as the
metrics label it), ``http.response.status_code``, ``url.path``, ``rocmforge.request_id``;
status ERROR for 5xx. ``llm.request`` attributes: ``rocmforge.request_id``,
``gen_ai.usage.input_tokens`` / ``output_tokens``, ``gen_ai.response.finish_reasons``,
``rocmforge.cached_tokens``, ``rocmforge.num_preemptions``; status ERROR when the request
failed. An incoming W3C ``traceparent`` header makes the HTTP span its child. The trace id
(32 hex digits) is bound in :data:`rocmforge.logs.trace_id_var` for the request, so its log
lines carry it.

Engine spans are built retroactively when the HTTP request ends, from the monotonic
timestamps the engine recorded; the engine thread never calls tracing code. Monotonic
stamps become wall-clock nanoseconds through one offset measured when :class:`Tracing` is
built, and the HTTP span is timed on the same clock, so children nest in their parent.

Which engine requests an HTTP request owns: the routes submit under the middleware's
request id ``X``, or ``X-0`` ... ``X-<k-1>`` for several choices / prompts. When the HTTP
request ends, :class:`HttpTrace` looks ``X`` up in the engine's statuses, else ``X-0``,
``X-1``, ... until one is missing; a status counts only if the engine request arrived
after the HTTP request began (so ``/status/X`` of an earlier request, or a reused client
id, attaches nothing). (The engine's :class:`~rocmforge.engine.stats.FinishedRequestStats`
would be the other place to hook in, but it carries neither the request id nor absolute
timestamps.)

Off (no endpoint configured, or the packages missing): no :class:`Tracing` exists, the
middleware holds ``None`` and does one ``is None`` check per request: no tracer provider,
no span objects, no bookkeeping. The OpenTelemetry packages are optional (the ``otlp``
extra); this module imports without them and says so when tracing is asked for.

Ownership: a :class:`Tracing` owns its :class:`TracerProvider` (never installed as the
process-global one, so several servers, or tests, in one process do not mix); the server's
lifespan shuts it down (flushing the batch) at exit.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from rocmforge import __version__
from rocmforge.engine.request_status import RequestStatus
from rocmforge.errors import RequestNotFoundError
from rocmforge.server.metrics import HTTP_METHODS, UNMATCHED_ROUTE, route_template

try:
    from opentelemetry import trace
    from opentelemetry.context import Context
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
    from opentelemetry.trace import Span, SpanKind, Status, StatusCode
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    _OTEL_MISSING: str | None = None
except ImportError as exc:  # the `otlp` extra is not installed: tracing_from_settings says so
    _OTEL_MISSING = str(exc)

if TYPE_CHECKING:
    from rocmforge.server.middleware import Message, Scope, Send
    from rocmforge.settings import SettingsBase

logger = logging.getLogger(__name__)

SERVICE_NAME = "rocmforge"
OTLP_EXPORTERS = {
    "http/protobuf": (
        "opentelemetry.exporter.otlp.proto.http.trace_exporter", "opentelemetry-exporter-otlp-proto-http"
    ),
    "grpc": ("opentelemetry.exporter.otlp.proto.grpc.trace_exporter", "opentelemetry-exporter-otlp-proto-grpc"),
}
"""Protocol -> (module holding ``OTLPSpanExporter``, the package that provides it)."""
ENGINE_SPAN = "llm.request"


class Tracing:
    """A tracer on its own provider, and the clock that puts the engine's ``time.monotonic()``
    stamps on the wall clock."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("rocmforge", __version__)
        self._offset_ns = time.time_ns() - time.monotonic_ns()

    def wall_ns(self, monotonic_s: float) -> int:
        """Nanoseconds since the epoch of a ``time.monotonic()`` stamp."""
        return round(monotonic_s * 1e9) + self._offset_ns

    def request_tracer(self, engine_status: Callable[[str], RequestStatus]) -> RequestTracer:
        """The middleware's side: traces HTTP requests served by the engine behind ``engine_status``."""
        return RequestTracer(self, engine_status)

    def shutdown(self) -> None:
        """Export what is still batched (waits for the exporter) and stop."""
        self.provider.shutdown()


def setup_tracing(exporter: SpanExporter, *, batch: bool = True) -> Tracing:
    """Tracing into ``exporter``: batched on a background thread (``batch``), or exported as
    each span ends (tests, with an in-memory exporter)."""
    if _OTEL_MISSING is not None:
        raise ImportError(f"tracing needs the OpenTelemetry SDK (pip install 'rocmforge[otlp]'): {_OTEL_MISSING}")
    provider = TracerProvider(resource=Resource.create({"service.name": SERVICE_NAME, "service.version": __version__}))
    provider.add_span_processor(BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter))
    return Tracing(provider)


def tracing_from_settings(settings: SettingsBase) -> Tracing | None:
    """OTLP tracing when an endpoint is configured and the packages are installed; else None
    (with a warning when tracing was asked for but cannot run). The exporter reads the
    ``OTEL_EXPORTER_OTLP_*`` variables (endpoint, headers, timeout) itself."""
    if settings.otel_exporter_otlp_endpoint is None:
        return None
    protocol = settings.otel_exporter_otlp_protocol
    module_name, package = OTLP_EXPORTERS[protocol]
    if _OTEL_MISSING is not None:
        logger.warning("tracing is off: OTEL_EXPORTER_OTLP_ENDPOINT is set but the OpenTelemetry SDK is not "
                       "installed (pip install 'rocmforge[otlp]'): %s", _OTEL_MISSING)
        return None
    try:
        exporter_class = importlib.import_module(module_name).OTLPSpanExporter
    except ImportError as exc:
        logger.warning("tracing is off: OTLP over %s needs %s (pip install %s%s): %s", protocol, package, package,
                       " or 'rocmforge[otlp]'" if protocol == "http/protobuf" else "", exc)
        return None
    logger.info("tracing on: OTLP over %s to %s", protocol, settings.otel_exporter_otlp_endpoint)
    return setup_tracing(exporter_class())


# --- per HTTP request -------------------------------------------------------------------------


class RequestTracer:
    """Starts an :class:`HttpTrace` per HTTP request (used by the middleware)."""

    def __init__(self, tracing: Tracing, engine_status: Callable[[str], RequestStatus]) -> None:
        self.tracing = tracing
        self.engine_status = engine_status
        self._propagator = TraceContextTextMapPropagator()

    @contextmanager
    def trace(self, scope: Scope, headers: Mapping[bytes, bytes], request_id: str) -> Iterator[HttpTrace]:
        """The HTTP server span of one request, current (in OpenTelemetry's context) inside
        the block; ended, with the engine spans of its requests, when the block exits."""
        carrier = {name: headers[key].decode("latin-1")
                   for name, key in (("traceparent", b"traceparent"), ("tracestate", b"tracestate")) if key in headers}
        parent = self._propagator.extract(carrier) if carrier else None
        method = scope["method"] if scope["method"] in HTTP_METHODS else "_OTHER"
        started = time.monotonic()
        span = self.tracing.tracer.start_span(
            method,
            context=parent,
            kind=SpanKind.SERVER,
            start_time=self.tracing.wall_ns(started),
            attributes={"http.request.method": method, "url.path": scope["path"], "rocmforge.request_id": request_id},
        )
        http = HttpTrace(span, method)
        try:
            with trace.use_span(span, end_on_exit=False, record_exception=True, set_status_on_exception=False):
                yield http
        finally:
            self._finish(http, scope, request_id, started)

    def _finish(self, http: HttpTrace, scope: Scope, request_id: str, started: float) -> None:
        span = http.span
        route = route_template(scope)
        if route != UNMATCHED_ROUTE:
            span.set_attribute("http.route", route)
            span.update_name(f"{http.method} {route}")
        status = http.status if http.status is not None else 500  # the app raised before responding
        span.set_attribute("http.response.status_code", status)
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR))
        if span.is_recording():  # sampled: its children would be recorded too
            now = time.monotonic()
            context = trace.set_span_in_context(span)
            for engine_request in self._engine_requests(request_id, started):
                self._engine_spans(context, engine_request, now)
        span.end(end_time=self.tracing.wall_ns(http.ended if http.ended is not None else time.monotonic()))

    def _engine_requests(self, request_id: str, started: float) -> list[RequestStatus]:
        own = self._submitted(request_id, started)
        if own is not None:
            return [own]
        found: list[RequestStatus] = []
        while (choice := self._submitted(f"{request_id}-{len(found)}", started)) is not None:
            found.append(choice)
        return found

    def _submitted(self, request_id: str, started: float) -> RequestStatus | None:
        """The engine request with this id if it arrived during this HTTP request."""
        try:
            status = self.engine_status(request_id)
        except RequestNotFoundError:
            return None
        return status if status.arrival_time >= started else None

    def _engine_spans(self, parent: Context, status: RequestStatus, now: float) -> None:
        """``llm.request`` and its phases, from the request's timestamps. A request still
        running (its stream was abandoned, the cancel is on its way) ends ``now``."""
        tracer, ns = self.tracing.tracer, self.tracing.wall_ns
        arrival, scheduled, first = status.arrival_time, status.first_scheduled_time, status.first_token_time
        end = status.finished_time if status.finished_time is not None else now
        attributes: dict[str, Any] = {
            "rocmforge.request_id": status.request_id,
            "gen_ai.usage.input_tokens": status.num_prompt_tokens,
            "gen_ai.usage.output_tokens": status.num_output_tokens,
            "rocmforge.cached_tokens": status.num_cached_tokens,
            "rocmforge.num_preemptions": status.num_preemptions,
        }
        if status.finish_reason is not None:
            attributes["gen_ai.response.finish_reasons"] = (status.finish_reason,)
        request = tracer.start_span(ENGINE_SPAN, context=parent, start_time=ns(arrival), attributes=attributes)
        if status.finish_reason == "error":
            request.set_status(Status(StatusCode.ERROR, status.error))
        phases = [("queue", arrival, scheduled if scheduled is not None else end)]
        if scheduled is not None:
            phases.append(("prefill", scheduled, first if first is not None else end))
        if first is not None:
            phases.append(("decode", first, end))
        context = trace.set_span_in_context(request)
        for name, start, stop in phases:
            phase = tracer.start_span(name, context=context, start_time=ns(start),
                                      attributes={"rocmforge.request_id": status.request_id})
            phase.end(end_time=ns(stop))
        request.end(end_time=ns(end))


class HttpTrace:
    """One HTTP request's server span, and what the response told about it."""

    __slots__ = ("span", "method", "trace_id", "status", "ended")

    def __init__(self, span: Span, method: str) -> None:
        self.span = span
        self.method = method
        context = span.get_span_context()
        self.trace_id: str | None = format(context.trace_id, "032x") if context.trace_flags.sampled else None
        """For the logs: only traces that get exported."""
        self.status: int | None = None
        self.ended: float | None = None
        """``time.monotonic()`` of the last response message."""

    def wrap(self, send: Send) -> Send:
        """``send``, noting the status and the end of the response."""

        async def observed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.status = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self.ended = time.monotonic()

        return observed_send
