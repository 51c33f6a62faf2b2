"""``rocmforge serve``: load the model, start the engine, run uvicorn until a signal, drain.

Graceful shutdown is ours, not uvicorn's: uvicorn would stop listening at once (so ``/ready``
could not be seen answering 503 while draining) and re-raise the signal at exit (exit status
-15). :class:`DrainingServer` takes SIGTERM/SIGINT instead::

    1st signal ─▶ state.draining = True: /ready 503 "draining", new requests 503 server_draining
              ─▶ in-flight requests (streamed or not) run on for up to shutdown_timeout s
              ─▶ the rest are cancelled (finish_reason "cancelled", "the server is shutting
                 down"), the engine thread stops
              ─▶ uvicorn exits: stops listening, lets the responses' final events go out
                 (at most EXIT_GRACE_S), runs the lifespan shutdown
    2nd signal ─▶ the deadline moves to now: whatever still runs is cancelled at once

:func:`serve` then returns; the CLI flushes the logs and exits 0.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import signal
import socket
from dataclasses import dataclass
from types import FrameType

import uvicorn

from rocmforge.engine.async_engine import AsyncEngine
from rocmforge.errors import ConfigError, ServerError
from rocmforge.llm import LLM
from rocmforge.models.loader import ProgressCallback
from rocmforge.server.app import create_app, drain
from rocmforge.server.state import ServerState
from rocmforge.server.tracing import tracing_from_settings
from rocmforge.settings import SettingsBase

logger = logging.getLogger(__name__)

EXIT_GRACE_S = 3
"""After the drain: how long uvicorn waits for open responses to send their last bytes."""


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Address:
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"address must be HOST:PORT, got {text!r}", param="addr")
        return cls(host.strip("[]") or "127.0.0.1", int(port))


def build_state(settings: SettingsBase, progress: ProgressCallback | None = None) -> ServerState:
    llm = LLM.from_settings(settings, progress)
    engine = AsyncEngine.from_llm(llm)
    if llm.device_fallback is not None:
        logger.warning("serving on the CPU (fallback): %s", llm.device_fallback)
    return ServerState(
        engine=engine,
        tokenizer=llm.tokenizer,
        config=settings.server_config(),
        model_path=str(llm.path),
        device=str(llm.device),
        device_fallback=llm.device_fallback,
        memory_plan=llm.memory_plan,
        tracing=tracing_from_settings(settings),
    )


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose SIGTERM/SIGINT drains the engine before uvicorn stops (see the
    module docstring). uvicorn installs ``handle_exit`` as the signal handler; this override
    never records the signal, so uvicorn does not re-raise it at exit."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task[None] | None = None
        self.signals_received = 0

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A Python signal handler: runs on the main thread (the event loop's) between two
        # bytecodes, so only schedule work here.
        self.signals_received += 1
        loop = self._loop
        if loop is None or loop.is_closed():
            self.should_exit = True
            return
        # A fresh context: the interrupted code's (some request's log context) must not leak in.
        loop.call_soon_threadsafe(self._on_signal, signal.Signals(sig).name, context=contextvars.Context())

    def _on_signal(self, name: str) -> None:
        if self._drain_task is None:
            logger.warning("%s received: draining (shutdown timeout %.1f s; signal again to cancel everything now)",
                           name, self.state.config.shutdown_timeout)
            self._drain_task = asyncio.ensure_future(self._drain())
        else:
            logger.warning("%s received again: cancelling the requests in flight now", name)
            asyncio.ensure_future(drain(self.state, timeout=0.0))

    async def _drain(self) -> None:
        try:
            await drain(self.state)
        except Exception:  # the exit must happen whatever the drain did
            logger.exception("draining failed")
        finally:
            logger.info("drained: stopping the HTTP server")
            self.should_exit = True


def serve(state: ServerState, address: Address) -> None:
    """Serve until a signal, drain, return (raises :class:`ServerError` if it never started)."""
    app = create_app(state)
    config = uvicorn.Config(
        app,
        host=address.host,
        port=address.port,
        log_config=None,
        access_log=True,
        timeout_graceful_shutdown=EXIT_GRACE_S,
    )
    logger.info("listening on http://%s:%d (device %s)", address.host, address.port, state.device)
    server = DrainingServer(config, state)
    server.run()
    if not server.started:
        raise ServerError(f"the server did not start on {address.host}:{address.port} (see the log above)")
    logger.info("server stopped")
