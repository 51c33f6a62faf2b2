"""The messages between the asyncio side and the engine thread of :class:`AsyncEngine`.

Commands (``Submit``, ``Cancel``, ``Call``, ``Shutdown``) are posted by asyncio code and
handled on the engine thread between steps; ``Reply`` resolves the poster's future on its own
event loop; ``Sink`` is where one request's outputs go (an asyncio.Queue on the submitter's
loop, filled by ``deliver`` through ``call_soon_threadsafe``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rocmforge.outputs import RequestOutput
from rocmforge.pooling_params import PoolingParams
from rocmforge.sampling_params import SamplingParams
from rocmforge.structured.matcher import GrammarMatcher

if TYPE_CHECKING:
    from rocmforge.engine.llm_engine import LLMEngine

logger = logging.getLogger("rocmforge.engine.async_engine")




class Reply:
    """Resolves an asyncio future from the engine thread, on the future's own loop."""

    __slots__ = ("loop", "future")

    def __init__(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any]) -> None:
        self.loop = loop
        self.future = future

    def ok(self, value: Any) -> None:
        self._call(_set_result, value)

    def fail(self, exc: BaseException) -> None:
        self._call(_set_exception, exc)

    def _call(self, fn: Callable[[asyncio.Future[Any], Any], None], arg: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, self.future, arg)
        except RuntimeError:  # the caller's event loop is closed: nobody waits for this
            logger.debug("event loop closed, reply dropped")


def _set_result(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


class Sink:
    """Where one request's outputs go: an asyncio.Queue on the submitter's loop.

    Shared by the engine thread (which only schedules ``put_nowait`` on ``loop``) and the
    :class:`RequestStream` (which reads it). It holds no reference to the stream, so a
    stream nobody holds can be garbage collected (and then cancels its request)."""

    __slots__ = ("request_id", "loop", "queue")

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.request_id = request_id
        self.loop = loop
        self.queue: asyncio.Queue[RequestOutput] = asyncio.Queue()


@dataclass(slots=True)
class Submit:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams | PoolingParams
    sink: Sink
    reply: Reply
    grammar: GrammarMatcher | None = None
    """The request's structured-output matcher, compiled before posting (never on the
    engine thread, where a big schema would stall every running request)."""


@dataclass(slots=True)
class Cancel:
    request_id: str
    reply: Reply | None
    quiet: bool = False
    """Internal cancel (consumer went away): an unknown id is not an error."""


@dataclass(slots=True)
class Call:
    fn: Callable[[LLMEngine], Any]
    reply: Reply


@dataclass(slots=True)
class Shutdown:
    deadline: float
    reply: Reply | None


Command = Submit | Cancel | Call | Shutdown


def deliver(items: list[tuple[Sink, RequestOutput]]) -> None:
    """Runs on the consumer's event loop."""
    for sink, output in items:
        sink.queue.put_nowait(output)
