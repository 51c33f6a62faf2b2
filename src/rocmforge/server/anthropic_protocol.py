"""Request bodies of Anthropic's Messages API (``/v1/messages``, ``/v1/messages/count_tokens``)
as pydantic models, and their translation into the chat path.

Flows in: the JSON bodies the official ``anthropic`` SDK sends. Flows out: the conversation as
:class:`~rocmforge.server.protocol.ChatMessage` s (:meth:`Conversation.chat_messages`: a
``tool_use`` block becomes an assistant ``tool_calls`` entry with its input as JSON text, a
``tool_result`` block a ``tool`` message), the tools in OpenAI's function shape (what the chat
templates and the tool-call grammar read), and :class:`~rocmforge.sampling_params.SamplingParams`
(:meth:`MessagesRequest.to_sampling_params`, ``tool_choice`` ``any`` / ``tool`` enforced by the
same grammar as OpenAI's ``required`` / named choice).

As the OpenAI models, unknown fields are refused and types are strict; on top, Anthropic's own
rules: the conversation starts with a user turn, each ``tool_result`` answers a ``tool_use`` of
the assistant turn just before it, consecutive turns of one role are one turn. What cannot be
honoured is refused by name: image and document blocks (the model reads text), server tools,
and a final assistant turn (prefill). ``thinking`` is accepted; thinking blocks come from the server's reasoning parser.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from itertools import groupby
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)

from rocmforge.errors import InvalidGrammarError
from rocmforge.sampling_params import MAX_TOP_K, SamplingParams
from rocmforge.server.protocol import MAX_STOP_STRINGS, ChatMessage, FiniteFloat, Text, check_unique, force_tool_call
from rocmforge.structured import StructuredOutput

NonEmptyText = Annotated[Text, Field(min_length=1)]
Identifier = Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9_-]{1,256}$")]
SUPPORTED_BLOCKS = ("text", "tool_use", "tool_result", "thinking", "redacted_thinking")
MIN_THINKING_BUDGET = 1024
MAX_TOOL_USES = 128
"""Tool calls one assistant turn may carry (as ``ChatMessage.tool_calls``)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _supported_block(value: Any, allowed: tuple[str, ...] = SUPPORTED_BLOCKS) -> Any:
    """Refuse, by name, a content block of a type this server cannot take."""
    kind = value.get("type") if isinstance(value, dict) else None
    if isinstance(kind, str) and kind not in allowed:
        why = "the served model reads text only" if kind in ("image", "document") else "not supported here"
        raise ValueError(f"{kind} content blocks are not supported ({why}); blocks taken: {', '.join(allowed)}")
    return value


def _text_block_only(value: Any) -> Any:
    return _supported_block(value, ("text",))


class CacheControl(_Strict):
    """Accepted and needless: the prefix cache reuses every repeated prompt prefix by itself."""

    type: Literal["ephemeral"]
    ttl: Literal["5m", "1h"] | None = None


class TextBlock(_Strict):
    type: Literal["text"]
    text: NonEmptyText
    cache_control: CacheControl | None = None
    citations: list[dict[str, Any]] | None = None
    """Accepted in replayed turns; this server cites nothing."""


class DirectCaller(_Strict):
    type: Literal["direct"]


class ToolUseBlock(_Strict):
    """A tool call of an earlier assistant turn, as the client sends it back (the SDK's block
    object dumped whole, ``caller`` and ``toolset_name`` included)."""

    type: Literal["tool_use"]
    id: Identifier
    name: Annotated[StrictStr, Field(min_length=1, max_length=256)]
    input: dict[str, Any]
    caller: DirectCaller | None = None
    toolset_name: Text | None = None
    cache_control: CacheControl | None = None


class ToolResultBlock(_Strict):
    """What a tool answered (``is_error``: it failed, ``content`` says how)."""

    type: Literal["tool_result"]
    tool_use_id: Identifier
    content: Text | list[Annotated[TextBlock, BeforeValidator(_text_block_only)]] = ""
    is_error: StrictBool = False
    cache_control: CacheControl | None = None

    def text(self) -> str:
        body = self.content if isinstance(self.content, str) else "\n".join(b.text for b in self.content)
        return f"Error: {body}" if self.is_error else body


class ThinkingBlock(_Strict):
    """Reasoning of an earlier assistant turn: accepted, and left out of the prompt (as
    Anthropic drops earlier turns' thinking)."""

    type: Literal["thinking"]
    thinking: Text
    signature: Text | None = None


class RedactedThinkingBlock(_Strict):
    type: Literal["redacted_thinking"]
    data: Text


ContentBlock = Annotated[
    Annotated[TextBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock,
              Field(discriminator="type")],
    BeforeValidator(_supported_block),
]
_ROLE_BLOCKS = {"user": {"text", "tool_result"}, "assistant": {"text", "tool_use", "thinking", "redacted_thinking"},
                "system": {"text"}}


Role = Literal["user", "assistant", "system"]


class InputMessage(_Strict):
    role: Role
    content: NonEmptyText | Annotated[list[ContentBlock], Field(min_length=1)]

    @model_validator(mode="after")
    def _blocks_of_the_role(self) -> InputMessage:
        for block in self.blocks():
            if block.type not in _ROLE_BLOCKS[self.role]:
                raise ValueError(f"a {self.role} message cannot hold a {block.type} block")
        return self

    def blocks(self) -> list[Any]:
        if isinstance(self.content, str):
            return [TextBlock(type="text", text=self.content)]
        return list(self.content)


class ToolDefinition(_Strict):
    """A client tool: the model may answer with a ``tool_use`` block calling it."""

    type: Literal["custom"] | None = None
    name: Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9_-]{1,128}$")]
    description: Text | None = None
    input_schema: dict[str, Any]
    cache_control: CacheControl | None = None
    strict: StrictBool | None = None
    """Accepted: a forced call (``tool_choice`` ``any`` / ``tool``) always matches the schema."""

    @field_validator("type", mode="before")
    @classmethod
    def _custom_only(cls, kind: object) -> object:
        if kind not in (None, "custom"):
            raise ValueError(f"server tools ({kind!r}) are not supported: only client tools with an input_schema")
        return kind

    @field_validator("input_schema")
    @classmethod
    def _object_schema(cls, schema: dict[str, Any]) -> dict[str, Any]:
        if schema.get("type") != "object":
            raise ValueError('must be a JSON schema of an object ("type": "object")')
        if not isinstance(schema.get("properties", {}), dict):
            raise ValueError("properties must be an object")
        required = schema.get("required", [])
        if not isinstance(required, list) or not all(isinstance(name, str) for name in required):
            raise ValueError("required must be a list of property names")
        return schema

    def openai_function(self) -> dict[str, Any]:
        function: dict[str, Any] = {"name": self.name, "parameters": self.input_schema}
        if self.description is not None:
            function["description"] = self.description
        return {"type": "function", "function": function}


class ToolChoiceAuto(_Strict):
    type: Literal["auto"]
    disable_parallel_tool_use: StrictBool = False


class ToolChoiceAny(_Strict):
    type: Literal["any"]
    disable_parallel_tool_use: StrictBool = False


class ToolChoiceTool(_Strict):
    type: Literal["tool"]
    name: StrictStr
    disable_parallel_tool_use: StrictBool = False


class ToolChoiceNone(_Strict):
    type: Literal["none"]


ToolChoice = Annotated[ToolChoiceAuto | ToolChoiceAny | ToolChoiceTool | ToolChoiceNone, Field(discriminator="type")]


class ThinkingEnabled(_Strict):
    type: Literal["enabled"]
    budget_tokens: Annotated[StrictInt, Field(ge=MIN_THINKING_BUDGET)]
    display: Literal["summarized", "omitted"] | None = None


class ThinkingAdaptive(_Strict):
    type: Literal["adaptive"]
    display: Literal["summarized", "omitted"] | None = None


class ThinkingOther(_Strict):
    type: Literal["disabled", "between_tools"]


Thinking = Annotated[ThinkingEnabled | ThinkingAdaptive | ThinkingOther, Field(discriminator="type")]


class JsonOutputFormat(_Strict):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(_Strict):
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None
    """Accepted; a hint this server has no use for."""
    format: JsonOutputFormat | None = None
    """The text answer is JSON valid against this schema (the structured-output decoder)."""


class Metadata(_Strict):
    user_id: Annotated[Text, Field(max_length=256)] | None = None


class Conversation(_Strict):
    """What ``/v1/messages`` and ``/v1/messages/count_tokens`` share: the prompt and its tools."""

    model: NonEmptyText
    messages: Annotated[list[InputMessage], Field(min_length=1)]
    system: Text | Annotated[list[Annotated[TextBlock, BeforeValidator(_text_block_only)]], Field(min_length=1)] | None = None
    tools: Annotated[list[ToolDefinition], Field(max_length=128)] | None = None
    tool_choice: ToolChoice | None = None
    """Default: ``auto`` (with tools)."""
    thinking: Thinking | None = None
    """Accepted; thinking blocks come from the server's reasoning parser, whatever this says."""
    output_config: OutputConfig | None = None
    cache_control: CacheControl | None = None

    @model_validator(mode="after")
    def _anthropic_rules(self) -> Conversation:
        names = [tool.name for tool in self.tools or ()]
        check_unique(names, "tools: tool names")
        choice = self.tool_choice
        if isinstance(choice, ToolChoiceTool) and choice.name not in names:
            raise ValueError(f"tool_choice: no tool named {choice.name!r} in tools")
        if isinstance(choice, ToolChoiceAny | ToolChoiceTool) and not names:
            raise ValueError(f"tool_choice: {choice.type} needs tools")
        turns = [turn for turn in _turns(self.messages) if turn[0] != "system"]
        if not turns or turns[0][0] != "user":
            raise ValueError('messages: the first message must use the "user" role')
        if turns[-1][0] != "user":
            raise ValueError("messages: the last message must use the \"user\" role (a final assistant "
                             "turn to continue, prefill, is not supported)")
        called: set[str] = set()
        previous: set[str] = set()
        for role, blocks in turns:
            ids = {b.id for b in blocks if isinstance(b, ToolUseBlock)}
            if role == "assistant":
                if ids & called or len(ids) != sum(isinstance(b, ToolUseBlock) for b in blocks):
                    raise ValueError("messages: tool_use ids must be unique")
                if len(ids) > MAX_TOOL_USES:
                    raise ValueError(f"messages: at most {MAX_TOOL_USES} tool_use blocks in one assistant turn")
                called |= ids
                previous = ids
                continue
            for block in blocks:
                if isinstance(block, ToolResultBlock) and block.tool_use_id not in previous:
                    raise ValueError(f"messages: tool_result {block.tool_use_id!r} answers no tool_use of the "
                                     "assistant message before it")
            previous = set()
        return self

    @property
    def calls_tools(self) -> bool:
        """Whether the reply is read for tool calls (tools given, ``tool_choice`` not none)."""
        return bool(self.tools) and not isinstance(self.tool_choice, ToolChoiceNone)

    @property
    def parallel_tool_use(self) -> bool:
        choice = self.tool_choice
        return choice is None or isinstance(choice, ToolChoiceNone) or not choice.disable_parallel_tool_use

    def tool_dicts(self) -> list[dict[str, Any]] | None:
        """The tools in OpenAI's function shape (what templates and the tool-call grammar read)."""
        return [tool.openai_function() for tool in self.tools] if self.tools else None

    def forced_tools(self) -> list[dict[str, Any]] | None:
        """The tools one of which the reply must call (``any``: any; ``tool``: that one), or None."""
        tools = self.tool_dicts()
        if tools is None or not isinstance(self.tool_choice, ToolChoiceAny | ToolChoiceTool):
            return None
        if isinstance(self.tool_choice, ToolChoiceTool):
            return [t for t in tools if t["function"]["name"] == self.tool_choice.name]
        return tools

    def chat_messages(self) -> list[ChatMessage]:
        """The conversation in the chat path's form (module docstring)."""
        out: list[ChatMessage] = []
        if self.system:
            out.append(ChatMessage(role="system", content=_joined(self.system)))
        for role, blocks in _turns(self.messages):
            if role == "assistant":
                out.append(_assistant_message(blocks))
                continue
            for is_result, group in groupby(blocks, key=lambda b: isinstance(b, ToolResultBlock)):
                if is_result:
                    out += [ChatMessage(role="tool", tool_call_id=b.tool_use_id, content=b.text()) for b in group]
                else:
                    out.append(ChatMessage(role=role, content=_joined(list(group))))
        return out


class MessagesRequest(Conversation):
    """``POST /v1/messages``: Anthropic's fields, plus rocmforge's ``seed`` and ``ignore_eos``."""

    max_tokens: Annotated[StrictInt, Field(ge=1)]
    stop_sequences: Annotated[list[NonEmptyText], Field(max_length=MAX_STOP_STRINGS)] | None = None
    temperature: Annotated[FiniteFloat, Field(ge=0.0, le=1.0)] | None = None
    top_p: Annotated[FiniteFloat, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[StrictInt, Field(ge=0, le=MAX_TOP_K)] | None = None
    stream: StrictBool = False
    metadata: Metadata | None = None
    service_tier: Literal["auto", "standard_only"] | None = None
    """Accepted: there is one tier, ``standard``."""
    seed: Annotated[StrictInt, Field(ge=0, le=2**63 - 1)] | None = None
    ignore_eos: StrictBool | None = None

    @model_validator(mode="after")
    def _budget_below_max_tokens(self) -> MessagesRequest:
        if isinstance(self.thinking, ThinkingEnabled) and self.thinking.budget_tokens >= self.max_tokens:
            raise ValueError("max_tokens must be greater than thinking.budget_tokens")
        return self

    def to_sampling_params(self, *, tool_grammar: str | None = None,
                           keep_special_token_ids: tuple[int, ...] = ()) -> SamplingParams:
        """The request's sampling; ``tool_grammar`` (the tool-call format's grammar of the
        :meth:`forced_tools`) binds the reply when ``tool_choice`` forces a call."""
        kwargs: dict[str, Any] = self.model_dump(include={"temperature", "top_p", "top_k", "seed", "ignore_eos"},
                                                 exclude_none=True)
        if self.stop_sequences:
            kwargs["stop"] = self.stop_sequences
        fmt = self.output_config.format if self.output_config else None
        if fmt is not None:
            try:
                kwargs["structured"] = StructuredOutput(json=json.dumps(fmt.schema_))
            except InvalidGrammarError as exc:
                raise InvalidGrammarError(exc.message, param="output_config.format.schema") from None
        kwargs = force_tool_call(kwargs, tool_grammar)
        return SamplingParams(max_tokens=self.max_tokens, keep_special_token_ids=keep_special_token_ids, **kwargs)


class CountTokensRequest(Conversation):
    """``POST /v1/messages/count_tokens``: the prompt part of a Messages request."""


def _turns(messages: list[InputMessage]) -> Iterator[tuple[Role, list[Any]]]:
    """(role, blocks) per turn: consecutive messages of one role are one turn."""
    for role, group in groupby(messages, key=lambda m: m.role):
        yield role, [block for message in group for block in message.blocks()]


def _joined(content: str | list[TextBlock]) -> str:
    return content if isinstance(content, str) else "\n".join(block.text for block in content)


def _assistant_message(blocks: list[Any]) -> ChatMessage:
    """An assistant turn: its text, and its tool_use blocks as tool calls (thinking left out)."""
    text = _joined([b for b in blocks if isinstance(b, TextBlock)])
    calls = [{"id": b.id, "type": "function", "function": {"name": b.name, "arguments": json.dumps(b.input, ensure_ascii=False)}}
             for b in blocks if isinstance(b, ToolUseBlock)]
    if not calls:
        return ChatMessage(role="assistant", content=text)
    return ChatMessage.model_validate({"role": "assistant", "content": text or None, "tool_calls": calls})
