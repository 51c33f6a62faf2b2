"""Request and response bodies of the HTTP API (pydantic models).

Flows in: JSON bodies of the native (``/generate``) and OpenAI-compatible (``/v1/...``)
routes. Flows out: :class:`~rocmforge.sampling_params.SamplingParams` built from them
(``to_sampling_params``), and the response bodies. Unknown fields are rejected (a typo in a
parameter name must not silently do nothing); types are strict (``"0.5"`` is no number and
``"yes"`` no boolean); numbers must be finite; every string must be valid Unicode (JSON
escapes can spell a lone surrogate such as ``"\ud800"``, which no tokenizer or UTF-8 encoder
takes); every bound that ``SamplingParams`` checks is checked again there, so both paths share
one set of rules. Token ids are checked against the vocabulary by the engine
(``LLMEngine.check_request``), which knows it.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from rocmforge.errors import InvalidGrammarError
from rocmforge.sampling_params import MAX_LOGIT_BIAS, MAX_LOGPROBS, MAX_TOP_K, SamplingParams
from rocmforge.structured import StructuredOutput


def _valid_unicode(text: str) -> str:
    """Refuse text that cannot be UTF-8 encoded (a lone surrogate), naming where; the text
    itself is not echoed (it could not be written into the JSON answer either)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"not valid Unicode: an unpaired surrogate at character {exc.start}") from None
    return text


Text = Annotated[StrictStr, AfterValidator(_valid_unicode)]
"""A JSON string that is valid Unicode."""
FiniteFloat = Annotated[float, Field(allow_inf_nan=False, strict=True)]
"""A JSON number (ints too), never a string like ``"0.5"``, a bool, NaN or an infinity."""
TokenIds = Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(min_length=1)]
MAX_STOP_STRINGS = 16


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JsonSchemaFormat(_Strict):
    """OpenAI's ``response_format.json_schema``. The schema is always enforced (``strict``
    or not: a constrained decoder has no best-effort mode)."""

    name: Annotated[Text, Field(max_length=64)] = "response"
    description: Text | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type json_schema, and only with it")
        return self


class _SamplingFields(_Strict):
    """Sampling fields shared by every generation route (vLLM's names and meanings), and the
    structured-output constraints: OpenAI's ``response_format``, and as extensions
    ``grammar`` (Lark or llama.cpp GBNF), ``regex`` and ``choice``; at most one of them."""

    temperature: FiniteFloat | None = None
    top_p: FiniteFloat | None = None
    top_k: Annotated[StrictInt, Field(ge=-1, le=MAX_TOP_K)] | None = None
    min_p: FiniteFloat | None = None
    repetition_penalty: FiniteFloat | None = None
    presence_penalty: FiniteFloat | None = None
    frequency_penalty: FiniteFloat | None = None
    seed: StrictInt | None = None
    stop: Text | Annotated[list[Text], Field(max_length=MAX_STOP_STRINGS)] | None = None
    stop_token_ids: list[Annotated[StrictInt, Field(ge=0)]] | None = None
    ignore_eos: StrictBool | None = None
    min_tokens: StrictInt | None = None
    logit_bias: Annotated[dict[Annotated[int, Field(ge=0)], Annotated[FiniteFloat, Field(ge=-100, le=100)]],
                          Field(max_length=MAX_LOGIT_BIAS)] | None = None
    """OpenAI's ``{"token id": bias}`` (JSON keys are strings: ``"50256"`` is id 50256)."""
    response_format: ResponseFormat | None = None
    grammar: Text | None = None
    regex: Text | None = None
    choice: Annotated[list[Text], Field(min_length=1, max_length=1024)] | None = None

    def structured_output(self) -> StructuredOutput | None:
        """The one constraint the body asks for, or None. Raises ``InvalidGrammarError``
        naming the field (two constraints, a schema that cannot be written as JSON, ...)."""
        given: dict[str, dict[str, Any]] = {}
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            given["response_format"] = {"json_object": True}
        elif fmt is not None and fmt.json_schema is not None:
            given["response_format"] = {"json": fmt.json_schema.schema_}
        for name in ("grammar", "regex", "choice"):
            value = getattr(self, name)
            if value is not None:
                given[name] = {name: value}
        if len(given) > 1:
            raise InvalidGrammarError(f"{' and '.join(given)} both constrain the output; give one",
                                      param=list(given)[1])
        if not given:
            return None
        [(field, kwargs)] = given.items()
        try:
            return StructuredOutput(**kwargs)
        except InvalidGrammarError as exc:
            raise InvalidGrammarError(exc.message, param=structured_param(exc.param) if exc.param else field) from None

    def sampling_kwargs(self) -> dict[str, Any]:
        fields = self.model_dump(
            include={
                "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                "frequency_penalty", "seed", "stop_token_ids", "ignore_eos", "min_tokens",
            },
            exclude_none=True,
        )
        if self.stop is not None:
            fields["stop"] = [self.stop] if isinstance(self.stop, str) else self.stop
        if self.logit_bias:
            fields["logit_bias"] = self.logit_bias
        structured = self.structured_output()
        if structured is not None:
            fields["structured"] = structured
        return fields


def structured_param(kind: str) -> str:
    """The request field that carries a constraint of this kind."""
    return {"json": "response_format.json_schema.schema", "json_object": "response_format"}.get(kind, kind)


# --- native API -------------------------------------------------------------------------


class GenerateRequest(_SamplingFields):
    prompt: Text | TokenIds
    max_tokens: StrictInt = 64
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    add_special_tokens: StrictBool = True

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value: str | list[int]) -> str | list[int]:
        if isinstance(value, str) and not value:
            raise ValueError("prompt must not be empty")
        return value

    def to_sampling_params(self) -> SamplingParams:
        return SamplingParams(max_tokens=self.max_tokens, logprobs=self.logprobs, **self.sampling_kwargs())


class Timings(BaseModel):
    queue_ms: float | None
    prefill_ms: float | None
    decode_ms: float | None
    time_to_first_token_ms: float | None
    total_ms: float | None


class GenerateResponse(BaseModel):
    request_id: str
    text: str
    token_ids: list[int]
    num_prompt_tokens: int
    num_generated_tokens: int
    finish_reason: str
    stop_reason: str | int | None = None
    logprobs: list[dict[str, Any]] | None = None
    timings: Timings


# --- OpenAI-compatible API ------------------------------------------------------------


class StreamOptions(_Strict):
    include_usage: StrictBool = False


class CompletionRequest(_SamplingFields):
    model: Text | None = None
    prompt: Text | TokenIds | Annotated[list[Text], Field(min_length=1)]
    max_tokens: StrictInt | None = 16
    n: Annotated[StrictInt, Field(ge=1)] = 1
    """Choices per prompt; prompts x n is capped by ``max_choices_per_request`` (the route checks)."""
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    logprobs: Annotated[StrictInt, Field(ge=0, le=5)] | None = None
    echo: StrictBool = False
    user: Text | None = None

    def to_sampling_params(self, default_max_tokens: int) -> SamplingParams:
        max_tokens = self.max_tokens if self.max_tokens is not None else default_max_tokens
        return SamplingParams(max_tokens=max_tokens, logprobs=self.logprobs, **self.sampling_kwargs())


class TextPart(_Strict):
    type: Literal["text"]
    text: Text


class FunctionCall(_Strict):
    name: Annotated[Text, Field(min_length=1, max_length=256)]
    arguments: Text
    """The arguments as JSON text (OpenAI's wire format); must parse."""

    @field_validator("arguments")
    @classmethod
    def _json_arguments(cls, arguments: str) -> str:
        try:
            json.loads(arguments)
        except (ValueError, RecursionError):
            raise ValueError("function arguments must be JSON text") from None
        return arguments


class ToolCall(_Strict):
    """A tool call of an earlier assistant turn, as the client sends it back."""

    id: Annotated[Text, Field(max_length=256)]
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    """One message of the conversation. An assistant turn that only called tools has
    ``tool_calls`` and no ``content``; a ``tool`` message answers one of them
    (``tool_call_id``)."""

    role: Literal["system", "user", "assistant", "tool", "developer"]
    # validated in this order: each check below reads the fields before it
    tool_calls: Annotated[list[ToolCall], Field(min_length=1, max_length=128)] | None = None
    tool_call_id: Annotated[Text, Field(max_length=256)] | None = None
    content: Annotated[Text | list[TextPart] | None, Field(validate_default=True)] = None
    name: Text | None = None

    @field_validator("tool_calls")
    @classmethod
    def _calls_of_the_assistant(cls, calls: list[ToolCall] | None, info: ValidationInfo) -> list[ToolCall] | None:
        if calls is not None and info.data.get("role") != "assistant":
            raise ValueError("only an assistant message carries tool calls")
        return calls

    @field_validator("tool_call_id")
    @classmethod
    def _answer_of_a_tool(cls, call_id: str | None, info: ValidationInfo) -> str | None:
        if call_id is not None and info.data.get("role") != "tool":
            raise ValueError("only a tool message answers a tool call")
        return call_id

    @field_validator("content")
    @classmethod
    def _content_unless_calls(cls, content: Any, info: ValidationInfo) -> Any:
        if content is None and not info.data.get("tool_calls"):
            raise ValueError("required (only an assistant message with tool_calls may leave it out)")
        return content

    def text(self) -> str:
        """The content as one string (empty for a tool-calls-only turn)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def template_message(self) -> dict[str, Any]:
        """The message as chat templates read it (HF's convention): tool-call arguments as
        objects (templates write them with ``tojson``), absent fields left out."""
        message: dict[str, Any] = {"role": self.role, "content": None if self.content is None else self.text()}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_calls is not None:
            message["tool_calls"] = [
                {"id": call.id, "type": call.type,
                 "function": {"name": call.function.name, "arguments": json.loads(call.function.arguments)}}
                for call in self.tool_calls
            ]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class FunctionDefinition(_Strict):
    name: Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    description: Text | None = None
    parameters: dict[str, Any] | None = None
    """A JSON schema of the arguments (an object); none: any object."""
    strict: StrictBool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: StrictStr


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


def check_unique(names: list[str], what: str) -> None:
    """ValueError (``"<what> must be unique"``) when ``names`` repeat one: tool names, ids."""
    if len(set(names)) != len(names):
        raise ValueError(f"{what} must be unique")


RESERVED_TEMPLATE_VARIABLES = frozenset({"messages", "tools", "add_generation_prompt", "bos_token", "eos_token",
                                         "special_tokens_in_content"})
"""Template variables the server sets itself (and ``Tokenizer.encode_chat``'s own keywords)."""


class ChatCompletionRequest(_SamplingFields):
    model: Text | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    n: Annotated[StrictInt, Field(ge=1)] = 1
    """Choices; capped by ``max_choices_per_request`` (the route checks)."""
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    user: Text | None = None
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    """Default: ``auto`` with tools, ``none`` without."""
    parallel_tool_calls: StrictBool = True
    chat_template_kwargs: Annotated[dict[str, Any], Field(max_length=32)] | None = None
    """Extra variables of the chat template (vLLM's extension), e.g. Qwen3's ``enable_thinking``."""

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_variables(cls, variables: dict[str, Any] | None) -> dict[str, Any] | None:
        for name in variables or ():
            if not name.isidentifier() or name in RESERVED_TEMPLATE_VARIABLES:
                raise ValueError(f"{name!r} is not a template variable a request may set")
        return variables

    @model_validator(mode="after")
    def _tool_choice_of_the_tools(self) -> ChatCompletionRequest:
        names = [tool.function.name for tool in self.tools or ()]
        check_unique(names, "tools: function names")
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"tool_choice: no tool named {choice.function.name!r} in tools")
        if choice == "required" and not names:
            raise ValueError("tool_choice: required needs tools")
        return self

    @property
    def calls_tools(self) -> bool:
        """Whether the reply is parsed for tool calls (tools given, ``tool_choice`` not none)."""
        return bool(self.tools) and self.tool_choice != "none"

    def tool_dicts(self) -> list[dict[str, Any]] | None:
        """``tools`` as plain data (what templates and the tool-call grammar read), or None."""
        return [tool.model_dump(exclude_none=True) for tool in self.tools] if self.tools else None

    def forced_tools(self) -> list[dict[str, Any]] | None:
        """The tools one of which the reply must call (``required``: any; named: that one),
        or None when the model may answer in text."""
        tools = self.tool_dicts()
        if tools is None or self.tool_choice in (None, "none", "auto"):
            return None
        if isinstance(self.tool_choice, NamedToolChoice):
            return [t for t in tools if t["function"]["name"] == self.tool_choice.function.name]
        return tools

    def to_sampling_params(self, default_max_tokens: int, *, tool_grammar: str | None = None,
                           keep_special_token_ids: tuple[int, ...] = ()) -> SamplingParams:
        """The request's sampling; ``tool_grammar`` (the tool-call format's grammar of the
        :meth:`forced_tools`) binds the reply when ``tool_choice`` forces a call."""
        max_tokens = self.max_completion_tokens or self.max_tokens or default_max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        kwargs = force_tool_call(self.sampling_kwargs(), tool_grammar)
        return SamplingParams(max_tokens=max_tokens, logprobs=logprobs, keep_special_token_ids=keep_special_token_ids,
                              **kwargs)


def force_tool_call(kwargs: dict[str, Any], grammar: str | None) -> dict[str, Any]:
    """``SamplingParams`` keyword arguments with ``grammar`` (the tool-call format's grammar
    of the tools one of which the reply must call) as the output constraint; unchanged when
    it is None. No other output constraint can hold alongside (``InvalidGrammarError``
    naming ``tool_choice``)."""
    if grammar is None:
        return kwargs
    if "structured" in kwargs:
        raise InvalidGrammarError("tool_choice forces a tool call: no other output constraint can hold",
                                  param="tool_choice")
    return {**kwargs, "structured": StructuredOutput(grammar=grammar)}


class TokenizeRequest(_Strict):
    prompt: Text | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: StrictBool = True
    model: Text | None = None


class DetokenizeRequest(_Strict):
    tokens: list[Annotated[StrictInt, Field(ge=0)]]
    model: Text | None = None
