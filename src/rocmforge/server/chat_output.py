"""What a chat reply's text holds: reasoning, content and tool calls, whole or streamed.

Every chat API (OpenAI's chat completions, and the Ollama and Anthropic routes) reads a
generated text the same way: the reasoning block first (:mod:`rocmforge.server.reasoning`),
then, in what follows it, the tool calls of the server's format
(:mod:`rocmforge.server.tool_calls`). :func:`chat_output` decides, per request, which of
those apply (the server's formats, whether the request offered tools, whether its prompt
left the model inside a think block); :class:`ChatOutput` then parses whole replies and
makes one :class:`ChoiceStream` per streamed choice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rocmforge.sampling_params import SamplingParams
from rocmforge.server.reasoning import ReasoningFormat, ReasoningStream
from rocmforge.server.state import ChatStats, ServerState
from rocmforge.server.tool_calls import ParsedToolCall, ToolCallStream, ToolFormat

PROMPT_TAIL_TOKENS = 16
"""Prompt tokens read to tell whether the prompt ends inside a think block."""


@dataclass(slots=True)
class ParsedReply:
    """A whole reply: reasoning (None: it had none), content (None: only tool calls) and calls."""

    reasoning: str | None
    content: str | None
    calls: list[ParsedToolCall] = field(default_factory=list)


@dataclass(slots=True)
class ReplyDelta:
    """What one piece of a streamed reply adds: reasoning text, content text, and OpenAI
    ``tool_calls`` deltas (``index``, then ``id``/``type``/``function.name`` once, and
    ``function.arguments`` pieces)."""

    reasoning: str = ""
    content: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    calls: list[ParsedToolCall] = field(default_factory=list)
    """At the end only: the reply's calls, whole (their ids are those of the deltas)."""


@dataclass(frozen=True, slots=True)
class ChatOutput:
    """How one request's replies are read."""

    reasoning: ReasoningFormat | None = None
    starts_inside: bool = False
    """The prompt ended inside a think block: the reply begins with reasoning."""
    tools: ToolFormat | None = None
    """The tool-call format, when the request offered tools (and did not say ``none``)."""
    stats: ChatStats | None = None
    """Where each whole or finished reply is counted."""

    def parse(self, text: str) -> ParsedReply:
        reply = self._parse(text)
        if self.stats is not None:
            self.stats.count(len(reply.calls), reply.reasoning is not None)
        return reply

    def _parse(self, text: str) -> ParsedReply:
        reasoning, content = (None, text) if self.reasoning is None else self.reasoning.split(text, self.starts_inside)
        reasoning = reasoning or None  # an empty block is none, as a stream sends nothing for it
        if self.tools is None:
            return ParsedReply(reasoning, content)
        answer, calls = self.tools.parse(content)
        return ParsedReply(reasoning, answer if calls else content, calls)

    def stream(self) -> ChoiceStream:
        return ChoiceStream(self)


class ChoiceStream:
    """One streamed choice: text deltas in, :class:`ReplyDelta` out."""

    def __init__(self, output: ChatOutput) -> None:
        self._output = output
        self._reasoning = ReasoningStream(output.reasoning, output.starts_inside) if output.reasoning else None
        self._tools = ToolCallStream(output.tools) if output.tools else None

    def feed(self, delta: str) -> ReplyDelta:
        reasoning, content = self._reasoning.feed(delta) if self._reasoning else ("", delta)
        if self._tools is None:
            return ReplyDelta(reasoning, content)
        content, tool_calls = self._tools.feed(content)
        return ReplyDelta(reasoning, content, tool_calls)

    def finish(self, full_text: str) -> ReplyDelta:
        """The rest, once the output is complete (``full_text``: all of it)."""
        out = self._output
        block, whole = (None, full_text) if out.reasoning is None else out.reasoning.split(full_text, out.starts_inside)
        reasoning, content = self._reasoning.finish() if self._reasoning else ("", "")
        tool_calls: list[dict[str, Any]] = []
        calls: list[ParsedToolCall] = []
        if self._tools is not None:
            content, tool_calls, calls = self._tools.finish(whole)
        if out.stats is not None:
            out.stats.count(len(calls), bool(block))  # as parse() counts: an empty block is none
        return ReplyDelta(reasoning, content, tool_calls, calls)


def tool_sampling(state: ServerState, forced_tools: Sequence[dict[str, Any]] | None, *, parallel: bool,
                  calls_tools: bool) -> tuple[str | None, tuple[int, ...]]:
    """What a request offering tools adds to its sampling: the grammar that forces a call of
    ``forced_tools`` (None: the model may answer in text) and the control tokens of the
    format whose text the parser must see."""
    fmt = state.tool_format
    grammar = fmt.grammar(forced_tools, parallel, state.tokenizer) if forced_tools else None
    if not calls_tools:
        return grammar, ()
    tokenizer = state.tokenizer
    kept = [token_id for text in fmt.control_tokens
            if (token_id := tokenizer.token_to_id(text)) is not None and tokenizer.is_special(token_id)]
    return grammar, tuple(kept)


def json_reply(params: SamplingParams, forced_call: bool) -> bool:
    """Whether a grammar makes the whole reply JSON (or a forced call) from its first token:
    a JSON schema or object, or ``tool_choice`` forcing a call. A regex or grammar may spell
    out a think block itself; these cannot."""
    structured = params.structured
    return forced_call or (structured is not None and structured.kind in ("json", "json_object"))


def chat_output(state: ServerState, prompt_ids: Sequence[int], calls_tools: bool, *,
                json_only: bool = False) -> ChatOutput:
    """How the replies to a prompt are read on this server. A ``json_only`` reply
    (:func:`json_reply`) is not read for reasoning: it holds no think block, even where the
    prompt opened one."""
    reasoning = None if json_only else state.reasoning_format
    inside = False
    if reasoning is not None:
        tail = state.tokenizer.decode(list(prompt_ids[-PROMPT_TAIL_TOKENS:]))
        inside = reasoning.starts_inside(tail)
    return ChatOutput(reasoning, inside, state.tool_format if calls_tools else None, state.chat_stats)
