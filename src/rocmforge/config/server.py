"""The HTTP server's configuration: one frozen dataclass, each field's default and docstring
written here and nowhere else.

Flows in from the environment and the ``serve`` flags (:mod:`rocmforge.settings` and
:mod:`rocmforge.cli.config_options` derive their fields from this class); flows out to the
app (:mod:`rocmforge.server.app` and the routes, through ``ServerState.config``). Invalid
values raise :class:`~rocmforge.errors.ConfigError` naming the field on construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal, get_args

from rocmforge.config.fields import (
    Rule,
    apply_rules,
    boolean,
    choice,
    integer,
    non_empty_string,
    number,
    optional,
    strings,
)

ToolCallParser = Literal["auto", "hermes", "llama3_json", "mistral"]
TOOL_CALL_PARSERS: tuple[str, ...] = get_args(ToolCallParser)
ReasoningParser = Literal["auto", "think", "none"]
REASONING_PARSERS: tuple[str, ...] = get_args(ReasoningParser)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """What the HTTP layer enforces and shows, on top of the engine's limits."""

    model_name: str | None = None
    """Model id clients use in `model` fields and see in /v1/models (default: the file's stem)."""
    api_key: str | None = field(default=None, repr=False, metadata={"secret": True})
    """Bearer key required on every route but /health (unset: no authentication)."""
    cors_origins: tuple[str, ...] = ()
    """Allowed CORS origins (a JSON list in the environment); empty: CORS off."""
    max_body_bytes: int = 1 << 20
    """Largest accepted request body, in bytes (larger: 413)."""
    default_max_tokens: int = 256
    """max_tokens of OpenAI requests that leave it out (capped by the context left)."""
    max_choices_per_request: int = 64
    """Most engine requests one HTTP request may start: prompts x n (more: 400)."""
    special_tokens_in_content: bool = False
    """Parse control-token text written in chat message content as control tokens (off: it is
    tokenized as plain text, so a user cannot forge a turn of another role)."""
    tool_call_parser: ToolCallParser = "auto"
    """Format of the model's tool calls: hermes, llama3_json or mistral (auto: the one the
    chat template writes; hermes for templates without tool support)."""
    reasoning_parser: ReasoningParser = "auto"
    """Reasoning blocks to split out as reasoning_content: think (<think>...</think>), or none
    (auto: think when the chat template writes think tags)."""
    shutdown_timeout: float = 30.0
    """Seconds in-flight requests get to finish after SIGTERM/SIGINT before they are cancelled."""
    warmup: bool = True
    """Run one short generation at start-up before reporting ready."""

    RULES: ClassVar[dict[str, Rule]] = {
        "model_name": optional(non_empty_string), "api_key": optional(non_empty_string), "cors_origins": strings,
        "max_body_bytes": integer(1), "default_max_tokens": integer(1), "max_choices_per_request": integer(1),
        "special_tokens_in_content": boolean, "tool_call_parser": choice(*TOOL_CALL_PARSERS),
        "reasoning_parser": choice(*REASONING_PARSERS), "shutdown_timeout": number(0.0), "warmup": boolean,
    }

    def __post_init__(self) -> None:
        apply_rules(self)
