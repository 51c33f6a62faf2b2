"""Prometheus metrics: engine statistics counted exactly, HTTP metrics by route template.

Three layers: the :class:`AsyncEngine` with a :class:`PrometheusStatsLogger` in-process on a
tiny random-weight llama (known requests move the counters by exact amounts, also through
cancels, preemptions and prefix-cache hits); :class:`HttpMetricsMiddleware` on a small
in-process app; and ``/metrics`` of the shared live server (deltas only: other tests use
the same server).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from fastapi import APIRouter, FastAPI
from fastapi.responses import StreamingResponse
from live_server import HTTP_TIMEOUT, Server, wait_until_idle
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from rocmforge import LLM, SamplingParams
from rocmforge.engine.async_engine import AsyncEngine
from rocmforge.engine.stats import IterationStats
from rocmforge.server.metrics import (
    UNMATCHED_ROUTE,
    HttpMetrics,
    HttpMetricsMiddleware,
    PrometheusStatsLogger,
    token_buckets,
)
from rocmforge.synthetic import SyntheticSpec, random_hf_weights, write_gguf

T = TypeVar("T")

SPEC = SyntheticSpec(tie_embeddings=False)
HISTOGRAMS_PER_REQUEST = (
    "rocmforge_time_to_first_token_seconds",
    "rocmforge_e2e_request_latency_seconds",
    "rocmforge_request_queue_time_seconds",
    "rocmforge_request_prefill_time_seconds",
    "rocmforge_request_decode_time_seconds",
    "rocmforge_request_prompt_tokens",
    "rocmforge_request_generation_tokens",
)
FINISH_REASONS = ("stop", "length", "cancelled", "error")


def run(coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.002)


def prompt(length: int, offset: int = 0) -> list[int]:
    return [(7 * i + offset) % (SPEC.vocab_size - 10) + 5 for i in range(length)]


def kv_bytes(num_blocks: int, block_size: int) -> int:
    """KV-cache memory that gives :data:`SPEC` a pool of ``num_blocks`` fp32 blocks (K and V,
    all layers), plus the runner's scratch block."""
    return (num_blocks + 1) * 2 * SPEC.num_layers * block_size * SPEC.num_kv_heads * SPEC.head_dim * 4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("metrics") / "tiny-llama.gguf"
    write_gguf(path, SPEC, random_hf_weights(SPEC, seed=3), seed=3)
    return path


@pytest.fixture
def make_llm(gguf_path: Path) -> Callable[..., LLM]:
    def make(**kwargs: Any) -> LLM:
        return LLM(gguf_path, device="cpu", dtype="float32", weight_format="dense", **kwargs)

    return make


class Metrics:
    """A registry with a stats logger, read by sample name and labels."""

    def __init__(self, max_model_len: int) -> None:
        self.registry = CollectorRegistry()
        self.logger = PrometheusStatsLogger(self.registry, max_model_len)

    def __call__(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels)
        assert value is not None, f"no sample {name}{labels}"
        return value

    def requests(self) -> dict[str, float]:
        return {r: self("rocmforge_requests_total", finish_reason=r) for r in FINISH_REASONS}


@asynccontextmanager
async def serving(llm: LLM, metrics: Metrics | None = None) -> AsyncIterator[AsyncEngine]:
    engine = AsyncEngine.from_llm(llm, stats_loggers=[metrics.logger] if metrics else ())
    engine.start()
    try:
        yield engine
    finally:
        await engine.shutdown(timeout=2.0)


# --- the engine's statistics ---------------------------------------------------------------------


def test_known_requests_move_every_counter_by_exact_amounts(make_llm: Callable[..., LLM]) -> None:
    llm = make_llm()
    metrics = Metrics(llm.engine.scheduler.scheduler_config.max_model_len)
    prompts = [prompt(n, offset=n) for n in (3, 9, 17, 30, 41)]
    max_tokens = [1, 2, 5, 8, 13]
    for reason in FINISH_REASONS:  # every series exists from the start
        assert metrics("rocmforge_requests_total", finish_reason=reason) == 0

    async def main() -> int:
        async with serving(llm, metrics) as engine:
            streams = await asyncio.gather(*(
                engine.submit(p, SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True))
                for p, m in zip(prompts, max_tokens)
            ))
            results = await asyncio.gather(*(s.result() for s in streams))
            assert [len(r.token_ids) for r in results] == max_tokens
            return engine.num_steps

    num_steps = run(main())
    n = len(prompts)
    assert metrics.requests() == {"stop": 0, "length": n, "cancelled": 0, "error": 0}
    assert metrics("rocmforge_generation_tokens_total") == sum(max_tokens)
    assert metrics("rocmforge_prompt_tokens_total") == sum(map(len, prompts))
    for name in HISTOGRAMS_PER_REQUEST:
        assert metrics(f"{name}_count") == n, name
    assert metrics("rocmforge_inter_token_latency_seconds_count") == sum(m - 1 for m in max_tokens)
    assert metrics("rocmforge_request_prompt_tokens_sum") == sum(map(len, prompts))
    assert metrics("rocmforge_request_generation_tokens_sum") == sum(max_tokens)
    assert metrics("rocmforge_engine_step_duration_seconds_count") == num_steps
    assert metrics("rocmforge_num_preemptions_total") == 0
    # Queue, prefill and decode split each request's life: they add up to end-to-end.
    phases = sum(metrics(f"rocmforge_request_{p}_time_seconds_sum") for p in ("queue", "prefill", "decode"))
    assert phases == pytest.approx(metrics("rocmforge_e2e_request_latency_seconds_sum"), rel=1e-6)
    # Time to first token is queue + prefill (both from the scheduler's timestamps).
    ttft = sum(metrics(f"rocmforge_request_{p}_time_seconds_sum") for p in ("queue", "prefill"))
    assert metrics("rocmforge_time_to_first_token_seconds_sum") == pytest.approx(ttft, rel=1e-6)


def test_cancelled_requests_count_as_cancelled(make_llm: Callable[..., LLM]) -> None:
    """One cancelled while decoding (its tokens so far count), one cancelled in the queue
    (it never ran: no queue, prefill, decode or first-token time)."""
    llm = make_llm(max_num_seqs=1)
    metrics = Metrics(llm.engine.scheduler.scheduler_config.max_model_len)
    running_prompt, queued_prompt = prompt(12), prompt(7, offset=1)
    long = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)

    async def main() -> int:
        async with serving(llm, metrics) as engine:
            running = await engine.submit(running_prompt, long)
            first = await running.__anext__()
            assert first.new_token_ids
            queued = await engine.submit(queued_prompt, long)
            assert engine.status(queued.request_id).queue_position == 0
            assert await queued.cancel()
            assert await running.cancel()
            done = await running.result()
            assert (await queued.result()).finish_reason == "cancelled"
            assert done.finish_reason == "cancelled" and 0 < len(done.token_ids) < 400
            return len(done.token_ids)

    delivered = run(main())
    assert metrics.requests() == {"stop": 0, "length": 0, "cancelled": 2, "error": 0}
    assert metrics("rocmforge_generation_tokens_total") == delivered
    assert metrics("rocmforge_prompt_tokens_total") == len(running_prompt)  # the queued one was never served
    assert metrics("rocmforge_e2e_request_latency_seconds_count") == 2
    assert metrics("rocmforge_request_prompt_tokens_sum") == len(running_prompt) + len(queued_prompt)
    for name in ("time_to_first_token", "request_queue_time", "request_prefill_time", "request_decode_time"):
        assert metrics(f"rocmforge_{name}_seconds_count") == 1, name
    assert metrics("rocmforge_inter_token_latency_seconds_count") == delivered - 1


def test_preemption_is_counted_and_nothing_counts_twice(make_llm: Callable[..., LLM]) -> None:
    # 24 blocks of 4 tokens; each request peaks at 20 + 40 - 1 = 59 tokens (15 blocks): a
    # request fits alone, several at once do not, so running requests preempt each other
    # and recompute their prompt and output.
    llm = make_llm(block_size=4, kv_cache_memory=kv_bytes(24, 4), max_num_seqs=8)
    assert llm.engine.scheduler.block_manager.num_blocks == 24
    metrics = Metrics(llm.engine.scheduler.scheduler_config.max_model_len)
    prompts = [prompt(20, offset=11 * i) for i in range(6)]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)

    async def main() -> int:
        async with serving(llm, metrics) as engine:
            streams = await asyncio.gather(*(engine.submit(p, params) for p in prompts))
            results = await asyncio.gather(*(s.result() for s in streams))
            assert all(len(r.token_ids) == 40 for r in results)
            return engine.stats().num_preemptions

    preemptions = run(main())
    assert preemptions > 0
    assert metrics("rocmforge_num_preemptions_total") == preemptions
    assert metrics.requests()["length"] == len(prompts)
    assert metrics("rocmforge_generation_tokens_total") == 40 * len(prompts)
    assert metrics("rocmforge_prompt_tokens_total") == 20 * len(prompts)
    assert metrics("rocmforge_time_to_first_token_seconds_count") == len(prompts)
    assert metrics("rocmforge_inter_token_latency_seconds_count") == 39 * len(prompts)


def test_a_repeated_prompt_hits_the_prefix_cache(make_llm: Callable[..., LLM]) -> None:
    llm = make_llm(block_size=16)
    metrics = Metrics(llm.engine.scheduler.scheduler_config.max_model_len)
    ids = prompt(40)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)

    async def main() -> None:
        async with serving(llm, metrics) as engine:
            await (await engine.submit(ids, params)).result()
            assert metrics("rocmforge_prefix_cache_queries_total") == 40
            assert metrics("rocmforge_prefix_cache_hits_total") == 0
            await (await engine.submit(ids, params)).result()
            stats = engine.stats()
            assert metrics("rocmforge_prefix_cache_queries_total") == stats.prefix_cache_queries == 80
            # Whole blocks, leaving one token to compute: 2 blocks of 16 of the 40 tokens.
            assert metrics("rocmforge_prefix_cache_hits_total") == stats.prefix_cache_hits == 32

    run(main())
    assert metrics("rocmforge_prompt_tokens_total") == 80  # hits are served prompt tokens too


def test_a_logger_attached_while_running_counts_from_then_on(make_llm: Callable[..., LLM]) -> None:
    llm = make_llm()
    metrics = Metrics(llm.engine.scheduler.scheduler_config.max_model_len)
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)

    async def main() -> None:
        async with serving(llm) as engine:
            await (await engine.submit(prompt(10), params)).result()
            engine.add_stats_logger(metrics.logger)
            await (await engine.submit(prompt(6, offset=2), params)).result()

    run(main())
    assert metrics.requests()["length"] == 1
    assert metrics("rocmforge_prompt_tokens_total") == 6
    assert metrics("rocmforge_generation_tokens_total") == 3
    assert metrics("rocmforge_prefix_cache_queries_total") == 6


def test_a_failing_logger_does_not_hurt_the_engine(make_llm: Callable[..., LLM]) -> None:
    class Broken:
        calls = 0

        def record(self, stats: IterationStats) -> None:
            Broken.calls += 1
            raise RuntimeError("metrics backend down")

    llm = make_llm()
    metrics = Metrics(llm.engine.scheduler.scheduler_config.max_model_len)

    async def main() -> None:
        engine = AsyncEngine.from_llm(llm, stats_loggers=[Broken(), metrics.logger])
        engine.start()
        try:
            done = await (await engine.submit(prompt(5), SamplingParams(max_tokens=4, ignore_eos=True))).result()
            assert done.finish_reason == "length" and engine.is_alive
        finally:
            await engine.shutdown(timeout=2.0)

    run(main())
    assert Broken.calls > 0
    assert metrics("rocmforge_generation_tokens_total") == 4  # the other logger still got everything


def test_token_buckets_follow_1_2_5_up_to_the_context() -> None:
    assert token_buckets(512) == (1, 2, 5, 10, 20, 50, 100, 200, 500)
    assert token_buckets(1000)[-1] == 1000


# --- the HTTP middleware, in-process --------------------------------------------------------------


def _http_app() -> tuple[FastAPI, CollectorRegistry]:
    app = FastAPI()
    registry = CollectorRegistry()
    router = APIRouter(prefix="/v1")

    @router.get("/things/{thing_id:path}")
    async def thing(thing_id: str) -> dict[str, str]:
        return {"id": thing_id}

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            for i in range(3):
                await asyncio.sleep(0.05)
                yield f"chunk {i}\n".encode()

        return StreamingResponse(chunks(), media_type="text/plain")

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("boom")

    app.include_router(router)
    app.add_middleware(HttpMetricsMiddleware, metrics=HttpMetrics(registry))
    return app, registry


def test_http_metrics_label_route_templates_and_time_whole_streams() -> None:
    app, registry = _http_app()

    def count(method: str, route: str, status: str) -> float:
        labels = {"method": method, "route": route, "status": status}
        return registry.get_sample_value("rocmforge_http_requests_total", labels) or 0.0

    async def main() -> None:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            for thing_id in ("a", "b/c", "d"):
                assert (await client.get(f"/v1/things/{thing_id}")).json() == {"id": thing_id}
            assert (await client.get("/nowhere/at/all")).status_code == 404
            assert (await client.post("/v1/things/a")).status_code == 405
            assert (await client.request("BREW", "/stream")).status_code == 405
            assert (await client.get("/boom")).status_code == 500
            response = await client.get("/stream")
            assert response.text == "chunk 0\nchunk 1\nchunk 2\n"

    run(main())
    assert count("GET", "/v1/things/{thing_id}", "200") == 3
    assert count("GET", UNMATCHED_ROUTE, "404") == 1
    assert count("POST", "/v1/things/{thing_id}", "405") == 1
    assert count("other", "/stream", "405") == 1
    assert count("GET", "/boom", "500") == 1
    assert count("GET", "/stream", "200") == 1
    labels = {"method": "GET", "route": "/stream"}
    assert registry.get_sample_value("rocmforge_http_request_duration_seconds_count", labels) == 1
    assert registry.get_sample_value("rocmforge_http_request_duration_seconds_sum", labels) >= 0.15


# --- the live server --------------------------------------------------------------------------------


def scrape(client: httpx.Client) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """``/metrics`` through the Prometheus text parser: (sample name, labels) -> value."""
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == CONTENT_TYPE_LATEST
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_metrics_endpoint_lists_every_family(server: Server) -> None:
    with httpx.Client(base_url=server.url, timeout=HTTP_TIMEOUT) as client:
        response = client.get("/metrics")
        assert response.headers["content-type"].startswith("text/plain; version=")
        families = {f.name: f.type for f in text_string_to_metric_families(response.text)}
    expected = {
        "rocmforge_requests": "counter",
        "rocmforge_prompt_tokens": "counter",
        "rocmforge_generation_tokens": "counter",
        "rocmforge_num_preemptions": "counter",
        "rocmforge_prefix_cache_queries": "counter",
        "rocmforge_prefix_cache_hits": "counter",
        "rocmforge_time_to_first_token_seconds": "histogram",
        "rocmforge_inter_token_latency_seconds": "histogram",
        "rocmforge_e2e_request_latency_seconds": "histogram",
        "rocmforge_request_queue_time_seconds": "histogram",
        "rocmforge_request_prefill_time_seconds": "histogram",
        "rocmforge_request_decode_time_seconds": "histogram",
        "rocmforge_request_prompt_tokens": "histogram",
        "rocmforge_request_generation_tokens": "histogram",
        "rocmforge_engine_step_duration_seconds": "histogram",
        "rocmforge_requests_running": "gauge",
        "rocmforge_requests_waiting": "gauge",
        "rocmforge_kv_cache_usage_ratio": "gauge",
        "rocmforge_engine_alive": "gauge",
        "rocmforge_build_info": "gauge",  # the text format has no info type
        "rocmforge_http_requests": "counter",
        "rocmforge_http_request_duration_seconds": "histogram",
    }
    assert {name: families.get(name) for name in expected} == expected


def test_generate_requests_move_the_counters(server: Server) -> None:
    prompts = [prompt(5), prompt(8, offset=1), prompt(13, offset=2)]
    max_tokens = [2, 3, 4]
    with httpx.Client(base_url=server.url, timeout=HTTP_TIMEOUT) as client:
        wait_until_idle(client)
        before = scrape(client)
        for ids, m in zip(prompts, max_tokens):
            response = client.post("/generate", json={"prompt": ids, "max_tokens": m, "ignore_eos": True,
                                                      "temperature": 0.0})
            assert response.status_code == 200, response.text
            assert response.json()["finish_reason"] == "length"
        request_id = response.json()["request_id"]
        assert client.get(f"/status/{request_id}").status_code == 200
        assert client.get("/no/such/route").status_code == 404
        after = scrape(client)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("rocmforge_http_requests_total", method="POST", route="/generate", status="200") == 3
    assert delta("rocmforge_http_request_duration_seconds_count", method="POST", route="/generate") == 3
    assert delta("rocmforge_http_requests_total", method="GET", route="/status/{request_id}", status="200") == 1
    assert delta("rocmforge_http_requests_total", method="GET", route=UNMATCHED_ROUTE, status="404") == 1
    assert delta("rocmforge_requests_total", finish_reason="length") == 3
    assert delta("rocmforge_requests_total", finish_reason="cancelled") == 0
    assert delta("rocmforge_prompt_tokens_total") == sum(map(len, prompts))
    assert delta("rocmforge_generation_tokens_total") == sum(max_tokens)
    for name in HISTOGRAMS_PER_REQUEST:
        assert delta(f"{name}_count") == 3, name
    assert delta("rocmforge_inter_token_latency_seconds_count") == sum(m - 1 for m in max_tokens)
    assert value(after, "rocmforge_engine_alive") == 1.0
    [build] = [labels for (name, labels) in after if name == "rocmforge_build_info"]
    assert dict(build)["device"] == "cpu"
