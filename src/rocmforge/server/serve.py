"""``rocmforge serve``: load the model, start the engine, run uvicorn until a signal.

Uvicorn handles SIGTERM/SIGINT: it stops accepting connections, lets open requests finish
(up to the shutdown timeout), then the app's lifespan drains the engine.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import uvicorn

from rocmforge.engine.async_engine import AsyncEngine
from rocmforge.errors import ConfigError
from rocmforge.llm import LLM
from rocmforge.models.loader import ProgressCallback
from rocmforge.server.app import create_app
from rocmforge.server.state import ServerConfig, ServerState
from rocmforge.settings import Settings

logger = logging.getLogger(__name__)


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


def build_state(settings: Settings, progress: ProgressCallback | None = None) -> ServerState:
    llm = LLM.from_settings(settings, progress)
    engine = AsyncEngine.from_llm(llm)
    config = ServerConfig(
        model_name=settings.model_name or llm.path.stem,
        api_key=settings.api_key.get_secret_value() if settings.api_key else None,
        cors_origins=tuple(settings.cors_origins),
        max_body_bytes=settings.max_body_bytes,
        shutdown_timeout=settings.shutdown_timeout,
    )
    return ServerState(engine=engine, tokenizer=llm.tokenizer, config=config, model_path=str(llm.path))


def serve(state: ServerState, address: Address) -> None:
    app = create_app(state)
    config = uvicorn.Config(
        app,
        host=address.host,
        port=address.port,
        log_config=None,
        access_log=True,
        timeout_graceful_shutdown=int(state.config.shutdown_timeout),
    )
    logger.info("listening on http://%s:%d", address.host, address.port)
    uvicorn.Server(config).run()
