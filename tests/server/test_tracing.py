"""OpenTelemetry traces: the HTTP server span and the engine spans under it.

In-process: a tiny random-weight llama, an :class:`AsyncEngine`, ``create_app`` run by
FastAPI's ``TestClient`` (lifespan included) and tracing into an in-memory exporter with a
simple (synchronous) span processor, so every span is exported when it ends. No global
tracer provider is ever set.
"""

from __future__ import annotations

import logging
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from rocmforge import LLM
from rocmforge.config import ServerConfig
from rocmforge.engine.async_engine import AsyncEngine
from rocmforge.logs import RequestContextFilter
from rocmforge.server.app import create_app
from rocmforge.server.state import ServerState
from rocmforge.server.tracing import OTLP_EXPORTERS, Tracing, setup_tracing, tracing_from_settings
from rocmforge.settings import Settings
from rocmforge.synthetic import SyntheticSpec, random_hf_weights, write_gguf
from rocmforge.testing.fault_spec import FaultInjection

SPEC = SyntheticSpec(tie_embeddings=False)
PROMPT = [5, 17, 42, 99, 7, 3]
MAX_TOKENS = 4
ENGINE_PHASES = ("queue", "prefill", "decode")
CLOCK_SLACK_NS = 50_000_000
"""Engine stamps reach the wall clock through one offset taken at start-up: allow for drift."""


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tracing") / "tiny-llama.gguf"
    write_gguf(path, SPEC, random_hf_weights(SPEC, seed=5), seed=5)
    return path


def make_app(gguf_path: Path, tracing: Tracing | None, faults: FaultInjection | None = None) -> FastAPI:
    llm = LLM(gguf_path, device="cpu", dtype="float32", weight_format="dense", faults=faults)
    state = ServerState(
        engine=AsyncEngine.from_llm(llm),
        tokenizer=llm.tokenizer,
        config=ServerConfig(model_name="tiny", warmup=False),
        model_path=str(gguf_path),
        tracing=tracing,
    )
    return create_app(state)


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def traced(gguf_path: Path, exporter: InMemorySpanExporter) -> Iterator[TestClient]:
    with TestClient(make_app(gguf_path, setup_tracing(exporter, batch=False))) as client:
        yield client


def generate_body(**extra: Any) -> dict[str, Any]:
    return {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True, **extra}


class Trace:
    """The exported spans, looked up by name and parent."""

    def __init__(self, exporter: InMemorySpanExporter) -> None:
        self.spans = exporter.get_finished_spans()

    def named(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.spans if s.name == name]

    def one(self, name: str) -> ReadableSpan:
        [span] = self.named(name)
        return span

    def children(self, parent: ReadableSpan) -> list[ReadableSpan]:
        return [s for s in self.spans if s.parent is not None and s.parent.span_id == parent.context.span_id]


def check_engine_spans(spans: Trace, http: ReadableSpan, request_id: str, num_output_tokens: int) -> ReadableSpan:
    """The ``llm.request`` of ``request_id`` under ``http`` with its three phases, in order
    and inside their parents; return it."""
    [request] = [s for s in spans.named("llm.request") if s.attributes["rocmforge.request_id"] == request_id]
    assert request.parent is not None and request.parent.span_id == http.context.span_id
    assert request.context.trace_id == http.context.trace_id
    assert request.kind is SpanKind.INTERNAL
    assert dict(request.attributes) == {
        "rocmforge.request_id": request_id,
        "gen_ai.usage.input_tokens": len(PROMPT),
        "gen_ai.usage.output_tokens": num_output_tokens,
        "gen_ai.response.finish_reasons": ("length",),
        "rocmforge.cached_tokens": 0,
        "rocmforge.num_preemptions": 0,
    }
    phases = {s.name: s for s in spans.children(request)}
    assert sorted(phases) == sorted(ENGINE_PHASES)
    queue, prefill, decode = (phases[name] for name in ENGINE_PHASES)
    assert all(p.context.trace_id == http.context.trace_id for p in phases.values())
    assert all(p.attributes["rocmforge.request_id"] == request_id for p in phases.values())
    # Contiguous phases covering the request exactly, inside the HTTP span.
    assert http.start_time <= request.start_time == queue.start_time
    assert queue.start_time <= queue.end_time == prefill.start_time
    assert prefill.start_time < prefill.end_time == decode.start_time  # a forward pass takes time
    assert decode.start_time < decode.end_time == request.end_time <= http.end_time
    return request


def test_generate_traces_http_and_engine_spans_in_one_trace(
    traced: TestClient, exporter: InMemorySpanExporter
) -> None:
    before = time.time_ns()
    response = traced.post("/generate", json=generate_body(), headers={"X-Request-Id": "trace-gen"})
    after = time.time_ns()
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["num_generated_tokens"] == MAX_TOKENS

    spans = Trace(exporter)
    assert sorted(s.name for s in spans.spans) == sorted(["POST /generate", "llm.request", *ENGINE_PHASES])
    http = spans.one("POST /generate")
    assert http.kind is SpanKind.SERVER and http.parent is None
    assert dict(http.attributes) == {
        "http.request.method": "POST",
        "http.route": "/generate",
        "http.response.status_code": 200,
        "url.path": "/generate",
        "rocmforge.request_id": "trace-gen",
    }
    assert http.status.status_code is StatusCode.UNSET
    assert before - CLOCK_SLACK_NS <= http.start_time < http.end_time <= after + CLOCK_SLACK_NS
    assert http.resource.attributes["service.name"] == "rocmforge"

    request = check_engine_spans(spans, http, "trace-gen", MAX_TOKENS)
    # The phases are the response's timings, on the same monotonic stamps.
    timings = body["timings"]
    phases = {s.name: s for s in spans.children(request)}
    for name in ENGINE_PHASES:
        duration_ms = (phases[name].end_time - phases[name].start_time) / 1e6
        assert duration_ms == pytest.approx(timings[f"{name}_ms"], abs=0.01)
    assert (request.end_time - request.start_time) / 1e6 == pytest.approx(timings["total_ms"], abs=0.01)


def test_streamed_request_has_engine_spans_under_the_http_span(
    traced: TestClient, exporter: InMemorySpanExporter
) -> None:
    with traced.stream("POST", "/generate/stream", json=generate_body(), headers={"X-Request-Id": "trace-stream"}) as r:
        assert r.status_code == 200
        events = r.read().decode()
    assert "event: done" in events

    spans = Trace(exporter)
    http = spans.one("POST /generate/stream")
    assert http.attributes["http.route"] == "/generate/stream"
    assert http.attributes["http.response.status_code"] == 200
    check_engine_spans(spans, http, "trace-stream", MAX_TOKENS)


def test_openai_choices_are_engine_spans_under_one_http_span(
    traced: TestClient, exporter: InMemorySpanExporter
) -> None:
    body = {"prompt": PROMPT, "n": 2, "max_tokens": 3, "temperature": 0.0, "ignore_eos": True}
    response = traced.post("/v1/completions", json=body, headers={"X-Request-Id": "trace-n2"})
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 2

    spans = Trace(exporter)
    http = spans.one("POST /v1/completions")
    assert len(spans.named("llm.request")) == 2
    for i in range(2):
        check_engine_spans(spans, http, f"trace-n2-{i}", 3)
    assert len({s.context.trace_id for s in spans.spans}) == 1


def test_incoming_traceparent_is_the_parent(traced: TestClient, exporter: InMemorySpanExporter) -> None:
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    response = traced.post("/generate", json=generate_body(),
                           headers={"traceparent": f"00-{trace_id}-{parent_id}-01", "X-Request-Id": "trace-remote"})
    assert response.status_code == 200

    spans = Trace(exporter)
    http = spans.one("POST /generate")
    assert format(http.context.trace_id, "032x") == trace_id
    assert http.parent is not None and http.parent.is_remote and format(http.parent.span_id, "016x") == parent_id
    check_engine_spans(spans, http, "trace-remote", MAX_TOKENS)


def test_requests_without_engine_work_get_only_the_http_span(
    traced: TestClient, exporter: InMemorySpanExporter
) -> None:
    assert traced.post("/generate", json=generate_body(), headers={"X-Request-Id": "again"}).status_code == 200
    exporter.clear()
    # Same request id, later HTTP request: the finished engine request is not attached to it.
    assert traced.get("/status/again", headers={"X-Request-Id": "again"}).status_code == 200
    assert traced.post("/generate", json={"prompt": []}).status_code == 400
    assert traced.get("/no/such/path").status_code == 404

    spans = Trace(exporter)
    assert sorted(s.name for s in spans.spans) == ["GET", "GET /status/{request_id}", "POST /generate"]
    status = spans.one("GET /status/{request_id}")
    assert status.attributes["http.route"] == "/status/{request_id}"
    invalid = spans.one("POST /generate")
    assert invalid.attributes["http.response.status_code"] == 400
    assert invalid.status.status_code is StatusCode.UNSET  # a client error is not the server's
    unmatched = spans.one("GET")
    assert unmatched.attributes["http.response.status_code"] == 404 and "http.route" not in unmatched.attributes
    assert len({s.context.trace_id for s in spans.spans}) == 3


def test_failed_request_marks_both_spans_as_errors(gguf_path: Path, exporter: InMemorySpanExporter) -> None:
    app = make_app(gguf_path, setup_tracing(exporter, batch=False), FaultInjection(forward_error=("boom",)))
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.post("/generate", json=generate_body(), headers={"X-Request-Id": "boom-1"})
    assert response.status_code >= 500

    spans = Trace(exporter)
    http = spans.one("POST /generate")
    assert http.attributes["http.response.status_code"] == response.status_code
    assert http.status.status_code is StatusCode.ERROR
    request = spans.one("llm.request")
    assert request.parent is not None and request.parent.span_id == http.context.span_id
    assert request.attributes["gen_ai.response.finish_reasons"] == ("error",)
    assert request.status.status_code is StatusCode.ERROR and request.status.description
    assert "decode" not in {s.name for s in spans.children(request)}  # no token was ever sampled


class Records(logging.Handler):
    """Collects records through the filter the real handlers carry."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.addFilter(RequestContextFilter())

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def records() -> Iterator[Records]:
    handler = Records()
    log = logging.getLogger("tests.tracing")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    yield handler
    log.removeHandler(handler)
    log.setLevel(logging.NOTSET)


def add_logging_route(app: FastAPI) -> None:
    async def handler() -> dict[str, str]:
        logging.getLogger("tests.tracing").info("inside the handler")
        return {}

    app.add_api_route("/test/log", handler, methods=["GET"])


def test_log_lines_carry_the_trace_id(gguf_path: Path, exporter: InMemorySpanExporter, records: Records) -> None:
    app = make_app(gguf_path, setup_tracing(exporter, batch=False))
    add_logging_route(app)
    with TestClient(app) as client:
        assert client.get("/test/log", headers={"X-Request-Id": "logged"}).status_code == 200

    [record] = records.records
    http = Trace(exporter).one("GET /test/log")
    assert record.request_id == "logged"
    assert record.trace_id == format(http.context.trace_id, "032x")


def test_off_means_no_tracer_and_no_trace_id(gguf_path: Path, records: Records) -> None:
    global_provider = trace.get_tracer_provider()
    app = make_app(gguf_path, None)
    add_logging_route(app)
    with TestClient(app) as client:
        assert client.get("/test/log", headers={"X-Request-Id": "untraced"}).status_code == 200
        assert client.post("/generate", json=generate_body()).status_code == 200

    [record] = records.records
    assert record.request_id == "untraced" and record.trace_id is None
    middleware = [m for m in app.user_middleware if m.cls.__name__ == "RequestContextMiddleware"]
    assert [m.kwargs["tracer"] for m in middleware] == [None]
    assert trace.get_tracer_provider() is global_provider  # nobody installed a global provider


def test_tracing_from_settings(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                 "OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"):
        monkeypatch.delenv(name, raising=False)
    assert tracing_from_settings(Settings(_env_file=None)) is None

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    for protocol, (module, package) in OTLP_EXPORTERS.items():
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
        monkeypatch.setitem(sys.modules, module, None)  # not installed: importing it raises
        with caplog.at_level(logging.WARNING, logger="rocmforge.server.tracing"):
            assert tracing_from_settings(Settings(_env_file=None)) is None
        assert f"tracing is off: OTLP over {protocol} needs {package}" in caplog.text
        caplog.clear()

    # Installed: the exporter class is built without arguments (it reads OTEL_* itself).
    fake = types.ModuleType(OTLP_EXPORTERS["http/protobuf"][0])
    fake.OTLPSpanExporter = InMemorySpanExporter  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, OTLP_EXPORTERS["http/protobuf"][0], fake)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    tracing = tracing_from_settings(Settings(_env_file=None))
    assert isinstance(tracing, Tracing)
    tracing.shutdown()


def test_wall_clock_conversion_keeps_monotonic_differences(exporter: InMemorySpanExporter) -> None:
    tracing = setup_tracing(exporter, batch=False)
    now_mono, now_wall = time.monotonic(), time.time_ns()
    assert abs(tracing.wall_ns(now_mono) - now_wall) < CLOCK_SLACK_NS
    assert tracing.wall_ns(now_mono + 1.5) - tracing.wall_ns(now_mono) == pytest.approx(1_500_000_000, abs=1_000)
    tracing.shutdown()

