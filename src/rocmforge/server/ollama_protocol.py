"""Request bodies of Ollama's API (``/api/generate``, ``/api/chat``, ``/api/show``, ...).

Flows in: the JSON bodies Ollama's clients send (the ``ollama`` package, Open WebUI,
LangChain's ChatOllama). Flows out: :class:`~rocmforge.sampling_params.SamplingParams`
(``sampling_params``), the conversation as the OpenAI-side
:class:`~rocmforge.server.protocol.ChatMessage` list the chat template path takes
(``ChatBody.chat_messages``), and the tools as plain data.

The rules are those of :mod:`rocmforge.server.protocol`: unknown fields are refused (in
``options`` too: a misspelt option must not silently do nothing), types are strict, strings
valid Unicode. Ollama's options that this server cannot honour are accepted only with their
neutral value (``mirostat: 0``, ``typical_p: 1``, ...); the load-time options (``num_ctx``,
``num_gpu``, ``num_thread``, ...) are accepted and ignored, the model being loaded once at
start-up. Without options the sampling defaults are Ollama's (temperature 0.8, top_k 40,
top_p 0.9); ``num_predict`` absent or -1 or -2 generates until the end of sequence or the
context window.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)

from rocmforge.errors import InvalidGrammarError, InvalidRequestError
from rocmforge.sampling_params import MAX_LOGPROBS, MAX_TOP_K, SamplingParams
from rocmforge.server.protocol import (
    MAX_STOP_STRINGS,
    ChatMessage,
    FiniteFloat,
    FunctionCall,
    Text,
    Tool,
    ToolCall,
    check_unique,
)
from rocmforge.structured import StructuredOutput

DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_K = 40
DEFAULT_TOP_P = 0.9
"""Ollama's sampling defaults (``api.DefaultOptions``), used where a request leaves them out."""

_OPTION_NAMES = {name: name for name in ("temperature", "top_k", "top_p", "min_p", "seed", "stop",
                                          "presence_penalty", "frequency_penalty")} | {
    "repetition_penalty": "repeat_penalty"}
"""SamplingParams fields set from ``options`` -> the option's name."""
_DURATION = re.compile(r"^[-+]?((\d+(\.\d*)?|\.\d+)(ns|us|\u00b5s|ms|s|m|h))+$|^[-+]?\d+(\.\d*)?$")
"""A Go duration (``5m``, ``1h30m``, ``-1s``) or a bare number of seconds, as ``keep_alive`` takes."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _neutral(value: float | int | None, neutral: float, name: str) -> None:
    if value is not None and value != neutral:
        raise ValueError(f"{name}: not supported by this server (only {neutral:g}, which disables it)")


class Options(_Strict):
    """Ollama's ``options`` (the Modelfile parameters). Honoured: ``temperature``, ``top_k``,
    ``top_p``, ``min_p``, ``seed``, ``num_predict``, ``stop``, ``repeat_penalty``,
    ``presence_penalty``, ``frequency_penalty``, ``repeat_last_n`` (0 or -1; see
    :meth:`_window`)."""

    # load-time options: the model is loaded once, at start-up; accepted and ignored
    numa: StrictBool | None = None
    num_ctx: StrictInt | None = None
    num_batch: StrictInt | None = None
    num_gpu: StrictInt | None = None
    main_gpu: StrictInt | None = None
    low_vram: StrictBool | None = None
    f16_kv: StrictBool | None = None
    logits_all: StrictBool | None = None
    vocab_only: StrictBool | None = None
    use_mmap: StrictBool | None = None
    use_mlock: StrictBool | None = None
    embedding_only: StrictBool | None = None
    num_thread: StrictInt | None = None
    num_keep: StrictInt | None = None
    """Tokens kept when the context shifts; this server never shifts the context."""
    penalize_newline: StrictBool | None = None
    """Deprecated in Ollama, which ignores it too."""

    # runtime options
    seed: StrictInt | None = None
    """-1 (Ollama's default): a random seed."""
    num_predict: StrictInt | None = None
    """Most tokens to generate; -1 (the default) or -2: until the context window is full."""
    top_k: Annotated[StrictInt, Field(ge=-1, le=MAX_TOP_K)] | None = None
    top_p: FiniteFloat | None = None
    min_p: FiniteFloat | None = None
    temperature: FiniteFloat | None = None
    repeat_penalty: FiniteFloat | None = None
    presence_penalty: FiniteFloat | None = None
    frequency_penalty: FiniteFloat | None = None
    repeat_last_n: StrictInt | None = None
    stop: Annotated[list[Text], Field(max_length=MAX_STOP_STRINGS)] | None = None
    # samplers this server does not have: only their neutral values
    tfs_z: FiniteFloat | None = None
    typical_p: FiniteFloat | None = None
    mirostat: StrictInt | None = None
    mirostat_tau: FiniteFloat | None = None
    mirostat_eta: FiniteFloat | None = None
    """Only read by mirostat (which must be 0): accepted, without effect."""

    @model_validator(mode="after")
    def _supported(self) -> Options:
        _neutral(self.tfs_z, 1.0, "tfs_z")
        _neutral(self.typical_p, 1.0, "typical_p")
        _neutral(self.mirostat, 0, "mirostat")
        if self.num_predict is not None and self.num_predict not in (-1, -2) and self.num_predict < 1:
            raise ValueError("num_predict must be positive, or -1 / -2 (until the context is full)")
        if self.seed is not None and self.seed < -1:
            raise ValueError("seed must be -1 (random) or non-negative")
        if self.repeat_last_n is not None and self.repeat_last_n < -1:
            raise ValueError("repeat_last_n must be -1 (the whole context), 0 (off) or positive")
        self._window()
        return self

    def _window(self) -> bool:
        """Whether the penalties apply. They span the whole prompt and output here (the
        repeat penalty) or the whole output (presence, frequency): ``repeat_last_n`` -1
        means that, 0 switches them off (as in llama.cpp); a window of N tokens is not
        supported, so a positive value is refused when a penalty would depend on it."""
        penalised = (self.repeat_penalty not in (None, 1.0) or self.presence_penalty not in (None, 0.0)
                     or self.frequency_penalty not in (None, 0.0))
        if self.repeat_last_n is not None and self.repeat_last_n > 0 and penalised:
            raise ValueError("repeat_last_n: a window of the last N tokens is not supported; "
                             "use -1 (the whole context) or 0 (no penalties)")
        return penalised and self.repeat_last_n != 0

    def sampling_kwargs(self) -> dict[str, Any]:
        """SamplingParams fields (without ``max_tokens`` and ``structured``)."""
        kwargs: dict[str, Any] = {
            "temperature": DEFAULT_TEMPERATURE if self.temperature is None else self.temperature,
            "top_k": DEFAULT_TOP_K if self.top_k is None else self.top_k,
            "top_p": DEFAULT_TOP_P if self.top_p is None else self.top_p,
        }
        if self.min_p is not None:
            kwargs["min_p"] = self.min_p
        if self.seed is not None and self.seed >= 0:
            kwargs["seed"] = self.seed
        if self.stop:
            kwargs["stop"] = self.stop
        if self._window():
            for ours, theirs in (("repetition_penalty", self.repeat_penalty),
                                 ("presence_penalty", self.presence_penalty),
                                 ("frequency_penalty", self.frequency_penalty)):
                if theirs is not None:
                    kwargs[ours] = theirs
        return kwargs


def _duration(value: str) -> str:
    if not _DURATION.match(value):
        raise ValueError(f"not a duration: {value!r} (e.g. 5m, 1h30m, -1)")
    return value


def _format_schema(value: Any) -> Any:
    if isinstance(value, str) and value not in ("", "json"):
        raise ValueError('format must be "json" or a JSON schema object')
    return value


KeepAlive = Annotated[StrictStr, AfterValidator(_duration)] | FiniteFloat
Format = Annotated[StrictStr | dict[str, Any], AfterValidator(_format_schema)]
"""``"json"``: any JSON object; an object: a JSON schema the output validates against; ``""``: free text."""
Think = StrictBool | Literal["high", "medium", "low"]


class _GenerationFields(_Strict):
    """What ``/api/generate`` and ``/api/chat`` share."""

    model: Text | None = None
    """Required (the route says so in Ollama's words when it is missing)."""
    format: Format | None = None
    options: Options | None = None
    stream: StrictBool = True
    keep_alive: KeepAlive | None = None
    """Accepted; the model stays loaded whatever it says."""
    think: Think | None = None
    """Whether the model thinks: with the server's reasoning parser its reasoning comes back as
    ``thinking``; ``false`` switches it off through the template (``enable_thinking``); on a
    model without reasoning anything but ``false`` is a 400."""
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None

    def structured_output(self) -> StructuredOutput | None:
        if self.format is None or self.format == "":
            return None
        kwargs: dict[str, Any] = {"json_object": True} if self.format == "json" else {"json": self.format}
        try:
            return StructuredOutput(**kwargs)
        except InvalidGrammarError as exc:
            raise InvalidGrammarError(exc.message, param="format") from None

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        kwargs = (self.options or Options()).sampling_kwargs()
        structured = self.structured_output()
        if structured is not None:
            kwargs["structured"] = structured
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        try:
            return SamplingParams(max_tokens=max_tokens, logprobs=logprobs, **kwargs)
        except InvalidRequestError as exc:  # say the option as the client spelt it
            option = _OPTION_NAMES.get(exc.param or "")
            if option is None:
                raise
            raise InvalidRequestError(exc.message.replace(exc.param or "", option, 1), param=f"options.{option}") \
                from None

    @property
    def num_predict(self) -> int | None:
        """The requested token count; None: until the context window is full."""
        value = self.options.num_predict if self.options is not None else None
        return None if value is None or value < 0 else value


class GenerateBody(_GenerationFields):
    prompt: Text = ""
    """Empty: nothing is generated; the answer says the model is loaded (``done_reason: load``)."""
    suffix: Text | None = None
    """Fill-in-the-middle: not supported (any non-empty suffix is refused)."""
    system: Text | None = None
    template: Text | None = None
    """A Go template overriding the model's: not supported (refused unless empty)."""
    context: list[Annotated[StrictInt, Field(ge=0)]] | None = None
    """Deprecated by Ollama: the ``context`` an earlier answer returned; generation continues after it."""
    raw: StrictBool = False
    images: list[Text] | None = None

    @model_validator(mode="after")
    def _supported(self) -> GenerateBody:
        if self.suffix:
            raise ValueError("suffix: fill-in-the-middle is not supported by this server")
        if self.template:
            raise ValueError("template: Ollama's Go templates are not supported; the model's chat template "
                             "is used, or send raw: true with a prompt already formatted")
        if self.images:
            raise ValueError("images: this server serves a text-only model")
        if self.raw and self.system:
            raise ValueError("system: a raw prompt is sent as it is, without a system message")
        return self


class OllamaFunctionCall(_Strict):
    name: Annotated[Text, Field(min_length=1, max_length=256)]
    arguments: dict[str, Any] = Field(default_factory=dict)
    """An object (Ollama's wire format), not JSON text."""
    index: Annotated[StrictInt, Field(ge=0)] | None = None


class OllamaToolCall(_Strict):
    function: OllamaFunctionCall
    id: Annotated[Text, Field(max_length=256)] | None = None
    type: Literal["function"] = "function"


class OllamaMessage(_Strict):
    role: Literal["system", "user", "assistant", "tool"]
    content: Text | None = None
    """Null or left out: empty."""
    images: list[Text] | None = None
    tool_calls: Annotated[list[OllamaToolCall], Field(max_length=128)] | None = None
    tool_name: Text | None = None
    """On a ``tool`` message: the function whose result it is."""
    thinking: Text | None = None
    """An earlier turn's reasoning, as clients send replies back: not shown to the model again."""

    @field_validator("images")
    @classmethod
    def _no_images(cls, images: list[str] | None) -> list[str] | None:
        if images:
            raise ValueError("this server serves a text-only model")
        return images

    @model_validator(mode="after")
    def _roles(self) -> OllamaMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("tool_calls: only an assistant message carries tool calls")
        if self.tool_name is not None and self.role != "tool":
            raise ValueError("tool_name: only a tool message names a tool")
        return self

    def chat_message(self, index: int) -> ChatMessage:
        """The message as the chat template path takes it: tool-call arguments as JSON text,
        each call with an id (the client's, or nine letters and digits made from the message's
        place, the shape Mistral's templates insist on)."""
        calls = [
            ToolCall(id=call.id or f"c{index:05d}{j:03d}",
                     function=FunctionCall(name=call.function.name,
                                           arguments=json.dumps(call.function.arguments, ensure_ascii=False)))
            for j, call in enumerate(self.tool_calls or ())
        ]
        return ChatMessage(role=self.role, content=self.content or "", tool_calls=calls or None, name=self.tool_name)


class ChatBody(_GenerationFields):
    messages: list[OllamaMessage] = Field(default_factory=list)
    """Empty: nothing is generated; the answer says the model is loaded (``done_reason: load``)."""
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None

    @model_validator(mode="after")
    def _unique_tools(self) -> ChatBody:
        check_unique([tool.function.name for tool in self.tools or ()], "tools: function names")
        return self

    def chat_messages(self) -> list[ChatMessage]:
        """The conversation for the template. Ollama's tool results carry no call id: each
        answers the next unanswered call of the assistant turn before it, in order."""
        out: list[ChatMessage] = []
        unanswered: list[str] = []
        for index, message in enumerate(self.messages):
            converted = message.chat_message(index)
            if converted.tool_calls:
                unanswered = [call.id for call in converted.tool_calls]
            elif converted.role == "tool" and unanswered:
                converted = converted.model_copy(update={"tool_call_id": unanswered.pop(0)})
            out.append(converted)
        return out

    def tool_dicts(self) -> list[dict[str, Any]] | None:
        return [tool.model_dump(exclude_none=True) for tool in self.tools] if self.tools else None


class ModelBody(_Strict):
    """The body of ``/api/show``, ``/api/pull``, ``/api/delete``, ...: a model name (Ollama's
    older clients call it ``name``)."""

    model: Text | None = None
    name: Text | None = None
    verbose: StrictBool = False
    """``/api/show``: also the large arrays of the metadata (the vocabulary, the merges)."""
    stream: StrictBool = True
    insecure: StrictBool | None = None

    def model_name(self) -> str:
        name = self.model or self.name
        if not name:
            raise InvalidRequestError("model is required", param="model")
        return name


class EmbedBody(_Strict):
    """``POST /api/embed``: ``input`` text or texts; ``truncate`` (default true) cuts each
    input to the context window instead of refusing it; ``dimensions`` keeps the first N."""

    model: Text | None = None
    input: Text | Annotated[list[Text], Field(min_length=1)]
    truncate: StrictBool = True
    dimensions: Annotated[StrictInt, Field(ge=1)] | None = None
    options: Options | None = None
    """Accepted: no option changes an embedding."""
    keep_alive: KeepAlive | None = None

    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class LegacyEmbeddingsBody(_Strict):
    """``POST /api/embeddings`` (Ollama's older route): one ``prompt``, its vector unnormalised."""

    model: Text | None = None
    prompt: Text
    options: Options | None = None
    keep_alive: KeepAlive | None = None
