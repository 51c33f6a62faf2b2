"""What the routes share: the engine, the tokenizer, the server's configuration, and the
lifecycle flags the probes read (``ready``, ``draining``).

Lifecycle: loading (no HTTP listener yet) -> warming up (``ready`` False) -> serving
(``ready`` True) -> draining (``draining`` True: a signal arrived, admission is closed,
in-flight requests finish or are cancelled at the shutdown timeout) -> exit."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rocmforge.engine.async_engine import AsyncEngine
from rocmforge.tokenizer import Tokenizer

if TYPE_CHECKING:
    from rocmforge.engine.memory import MemoryPlan
    from rocmforge.server.tracing import Tracing


@dataclass(slots=True)
class ServerConfig:
    model_name: str
    """The id clients use in ``model`` fields and see in ``/models``."""
    api_key: str | None = None
    """When set, every route but ``/health`` needs ``Authorization: Bearer <key>``."""
    cors_origins: tuple[str, ...] = ()
    """Allowed CORS origins; empty disables CORS."""
    max_body_bytes: int = 1 << 20
    default_max_tokens: int = 256
    """``max_tokens`` of OpenAI requests that leave it out (capped by the context left)."""
    shutdown_timeout: float = 30.0
    """Seconds in-flight requests get to finish after SIGTERM/SIGINT before they are cancelled."""
    warmup: bool = True
    """Run one short generation at start-up before reporting ready."""


@dataclass(slots=True)
class ServerState:
    engine: AsyncEngine
    tokenizer: Tokenizer
    config: ServerConfig
    model_path: str
    device: str = "cpu"
    """Where the model runs: ``cpu`` or ``cuda:N``."""
    device_fallback: str | None = None
    """Why the model runs on the CPU although ``auto`` wanted the GPU; None if it did not fall back."""
    memory_plan: MemoryPlan | None = None
    """How the device's memory was divided at start-up (``/health`` shows it)."""
    started_at: float = field(default_factory=time.time)
    ready: bool = False
    """A warm-up request has run: the server answers real requests at full speed."""
    draining: bool = False
    """Shutting down: admission is closed (new requests get 503 ``server_draining``)."""
    tracing: Tracing | None = None
    """OpenTelemetry request traces (:mod:`rocmforge.server.tracing`); None: off. The app's
    lifespan shuts it down (exporting what is still batched) at exit."""
