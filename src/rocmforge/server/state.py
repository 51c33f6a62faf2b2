"""What the routes share: the engine, the tokenizer, the server's configuration
(:class:`~rocmforge.config.ServerConfig`), and the lifecycle flags the probes read
(``ready``, ``draining``).

Lifecycle: loading (no HTTP listener yet) -> warming up (``ready`` False) -> serving
(``ready`` True) -> draining (``draining`` True: a signal arrived, admission is closed,
in-flight requests finish or are cancelled at the shutdown timeout) -> exit."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from rocmforge.config import ServerConfig
from rocmforge.engine.async_engine import AsyncEngine
from rocmforge.server.reasoning import ReasoningFormat, reasoning_format
from rocmforge.server.tool_calls import ToolFormat, tool_format
from rocmforge.tokenizer import Tokenizer

if TYPE_CHECKING:
    from rocmforge.engine.memory import MemoryPlan
    from rocmforge.server.tracing import Tracing


@dataclass(slots=True)
class ChatStats:
    """What the chat replies held, for ``/metrics`` (counted by
    :mod:`rocmforge.server.chat_output`, on the event loop)."""

    tool_calls: int = 0
    """Tool calls parsed from replies."""
    tool_call_replies: int = 0
    """Replies that called tools."""
    reasoning_replies: int = 0
    """Replies with a reasoning block."""

    def count(self, calls: int, reasoning: bool) -> None:
        self.tool_calls += calls
        self.tool_call_replies += calls > 0
        self.reasoning_replies += reasoning


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

    workers: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(
        max_workers=os.cpu_count() or 2, thread_name_prefix="rocmforge-cpu"))
    """Threads for the routes' CPU work (tokenizing, chat templates, decoding): off the event
    loop, and no more at once than there are cores, so the engine thread keeps its share."""

    chat_stats: ChatStats = field(default_factory=ChatStats)
    tool_format: ToolFormat = field(init=False)
    """How the model writes tool calls (``tool_call_parser``, read against the chat template)."""
    reasoning_format: ReasoningFormat | None = field(init=False)
    """How the model marks its reasoning (``reasoning_parser``); None: it does not."""

    def __post_init__(self) -> None:
        template = self.tokenizer.chat_template
        source = template.source if template is not None else None
        self.tool_format = tool_format(self.config.tool_call_parser, source)
        self.reasoning_format = reasoning_format(self.config.reasoning_parser, source)

    @property
    def model_name(self) -> str:
        """The id clients use in ``model`` fields: the configured one, or the file's stem."""
        return self.config.model_name or Path(self.model_path).stem
