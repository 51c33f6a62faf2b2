"""The FastAPI application: routes, error handlers, middleware, probes, metrics and traces.

In: a started :class:`AsyncEngine` and the server's configuration (:class:`ServerState`).
Out: an ASGI app. Building the engine and running uvicorn is :mod:`rocmforge.server.serve`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from rocmforge import __version__
from rocmforge.device import memory_usage
from rocmforge.engine.memory import MemoryPlan
from rocmforge.sampling_params import SamplingParams
from rocmforge.server import anthropic_api, embeddings_api, native, ollama_api, openai_api
from rocmforge.server.errors import install_error_handlers
from rocmforge.server.metrics import HttpMetrics, HttpMetricsMiddleware, make_registry, render
from rocmforge.server.middleware import RequestContextMiddleware
from rocmforge.server.state import ServerState
from rocmforge.server.streams import SafeJSONResponse

logger = logging.getLogger(__name__)


def create_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.engine.start()
        if state.config.warmup:
            await _warm_up(state)
        if not state.draining:  # a signal may have arrived during the warm-up
            state.ready = True
            logger.info("ready: serving %s on %s", state.model_name, state.device)
        try:
            yield
        finally:
            # `rocmforge serve` drains on the signal, before uvicorn stops (see serve.py): the
            # engine is stopped by now and this returns at once. Under a plain ASGI server this
            # is the drain.
            await drain(state)
            state.workers.shutdown(wait=False, cancel_futures=True)
            if state.tracing is not None:
                await asyncio.to_thread(state.tracing.shutdown)  # exports what is still batched

    app = FastAPI(
        title="rocmforge",
        version=__version__,
        description="LLM inference server for GGUF models: native and OpenAI-compatible APIs.",
        lifespan=lifespan,
        default_response_class=SafeJSONResponse,
    )
    app.state.rocmforge = state
    registry = make_registry(state)
    install_error_handlers(app)
    app.include_router(native.router)
    app.include_router(openai_api.router)
    app.include_router(anthropic_api.router)
    app.include_router(ollama_api.router)
    app.include_router(embeddings_api.router)
    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        """FastAPI's schema (built once), with the bodies of the Ollama routes, which read
        them by hand."""
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = default_openapi()
        ollama_api.add_body_schemas(schema)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.get("/health")
    async def health() -> JSONResponse:
        """Liveness: answers from memory (no engine round trip); 503 only when the engine is dead."""
        engine = state.engine
        alive = engine.is_alive
        memory = memory_usage(torch.device(state.device))
        body: dict[str, Any] = {
            "status": "ok" if alive else "dead",
            "version": __version__,
            "model": state.model_name,
            "device": {
                "name": state.device,
                "fallback": state.device_fallback is not None,
                "fallback_reason": state.device_fallback,
            },
            "memory": {"kind": memory.kind, "used_bytes": memory.used_bytes, "total_bytes": memory.total_bytes,
                       "plan": _plan_json(state.memory_plan)},
            "draining": state.draining,
            "uptime_s": round(time.time() - state.started_at, 3),
            "checks": {
                "engine_loop": "alive" if alive else f"dead: {engine.dead_reason}",
                "model_loaded": True,
                "kv_cache_usage": engine.kv_cache_usage,
            },
        }
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/ready")
    async def ready() -> JSONResponse:
        """Readiness: 200 only when the model is loaded and warmed up, the engine alive and
        running, the server not draining and the queue below capacity; else 503 and why."""
        engine = state.engine
        reason = None
        if not engine.is_alive:
            reason = f"engine is dead: {engine.dead_reason}"
        elif state.draining:
            reason = "draining: shutting down"
        elif not state.ready:
            reason = "warming up"
        elif not engine.is_running:
            reason = "engine is not running"
        elif engine.num_waiting >= engine.max_waiting:
            reason = "queue is full"
        status = 200 if reason is None else 503
        return JSONResponse({"ready": reason is None, "reason": reason}, status_code=status)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        return Response(render(registry), media_type=CONTENT_TYPE_LATEST)

    tracer = state.tracing.request_tracer(state.engine.status) if state.tracing is not None else None
    app.add_middleware(
        RequestContextMiddleware, max_body_bytes=state.config.max_body_bytes, api_key=state.config.api_key,
        tracer=tracer,
    )
    if state.config.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(state.config.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Request-Id"],
        )
    app.add_middleware(HttpMetricsMiddleware, metrics=HttpMetrics(registry))  # outermost: sees every request
    return app


async def drain(state: ServerState, timeout: float | None = None) -> None:
    """Close admission at once (``/ready`` 503, new requests 503 ``server_draining``), let
    in-flight requests finish for up to ``timeout`` seconds (default: the configured shutdown
    timeout), cancel the rest and stop the engine. Idempotent; a second call with a shorter
    timeout brings the deadline forward."""
    if not state.draining:
        state.draining = True
        logger.warning(
            "draining: %d running and %d waiting requests get up to %.1f s",
            state.engine.num_running, state.engine.num_waiting,
            state.config.shutdown_timeout if timeout is None else timeout,
        )
    state.ready = False
    await state.engine.shutdown(timeout=state.config.shutdown_timeout if timeout is None else timeout)


async def _warm_up(state: ServerState) -> None:
    """One short generation through the whole path (allocations, first-call overheads)."""
    ids = state.tokenizer.encode("Hello", add_special=True) or [0]
    stream = await state.engine.submit(ids, SamplingParams(max_tokens=2, temperature=0.0), request_id="warmup")
    await stream.result()


def _plan_json(plan: MemoryPlan | None) -> dict[str, int] | None:
    """The start-up memory plan as ``/health`` shows it."""
    if plan is None:
        return None
    return {"weights_bytes": plan.weight_bytes, "workspace_bytes": plan.workspace_bytes,
            "kv_cache_bytes": plan.kv_bytes, "kv_blocks": plan.num_blocks, "reserve_bytes": plan.reserve_bytes}
