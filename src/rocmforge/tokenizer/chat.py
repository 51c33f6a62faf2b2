"""Chat templates: a model's Jinja template rendered the way HF ``apply_chat_template`` does.

In: the template source (``tokenizer.chat_template``), and per request a list of messages
(each a mapping with a string ``role`` and string ``content``) plus template variables.
Out: the prompt text, special tokens written out as text (the tokenizer parses them).

The template is untrusted code from a model file, so it runs in Jinja's immutable sandbox
(no attribute access to internals, no mutation of the messages, bounded ``range``); unlike
Jinja's default, touching an unsafe attribute raises instead of rendering as empty.  The
environment matches HF's: ``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``, the
``{% generation %}`` tag, ``raise_exception``, ``strftime_now`` and a ``tojson`` that does
not HTML-escape.  Every failure -- syntax, runtime, sandbox, invalid messages -- is a
:class:`~rocmforge.errors.ChatTemplateError` with the cause chained.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, NoReturn

import jinja2
from jinja2 import nodes
from jinja2.exceptions import SecurityError
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from rocmforge.errors import ChatTemplateError

# Python errors a template can trigger at run time besides Jinja's own (``{{ 1 / 0 }}``,
# ``{{ messages[99] }}``, ``{{ 'a' + 1 }}``, ``range(10**9)``, runaway recursion).
_RUNTIME_ERRORS = (
    jinja2.TemplateError,
    TypeError,
    ValueError,
    LookupError,
    ArithmeticError,
    AttributeError,
    RecursionError,
)


class _TemplateRaised(jinja2.TemplateError):
    """What ``raise_exception(message)`` inside a template raises."""


def _raise_exception(message: str) -> NoReturn:
    raise _TemplateRaised(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """HF's ``tojson``: plain ``json.dumps`` (Jinja's built-in one HTML-escapes)."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


class _GenerationTag(Extension):
    """``{% generation %}...{% endgeneration %}`` (HF marks assistant spans): renders the body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return str(caller())


class _StrictSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, but an unsafe attribute access is an error, not an empty value."""

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
        )


@functools.cache
def _environment() -> _StrictSandbox:
    env = _StrictSandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class ChatTemplate:
    """A compiled chat template.  Compiling happens here, so a broken template fails early."""

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "") -> None:
        """Compile ``source``; ``bos_token``/``eos_token`` are the texts templates see by default.

        Raises :class:`ChatTemplateError` when the source is not a valid template.
        """
        if not isinstance(source, str):
            raise ChatTemplateError(f"chat template must be a string, got {type(source).__name__}")
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ChatTemplateError(
                f"chat template has a syntax error at line {exc.lineno}: {exc.message}"
            ) from exc

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        bos_token: str | None = None,
        eos_token: str | None = None,
        **extra: Any,
    ) -> str:
        """Render ``messages`` into a prompt.

        ``bos_token``/``eos_token`` default to the tokenizer's; ``extra`` (``tools``,
        ``documents``, ``enable_thinking``, ...) is passed to the template as variables.
        Raises :class:`ChatTemplateError` for invalid messages or when the template fails,
        including when it calls ``raise_exception`` (the template's message is kept).
        """
        validate_messages(messages)
        try:
            return self._template.render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token if bos_token is None else bos_token,
                eos_token=self.eos_token if eos_token is None else eos_token,
                **extra,
            )
        except _TemplateRaised as exc:
            raise ChatTemplateError(f"chat template rejected the conversation: {exc}") from exc
        except SecurityError as exc:
            raise ChatTemplateError(f"chat template violated the sandbox: {exc}") from exc
        except _RUNTIME_ERRORS as exc:
            raise ChatTemplateError(f"chat template failed: {type(exc).__name__}: {exc}") from exc

    def __repr__(self) -> str:
        return f"ChatTemplate({len(self.source)} chars)"


def validate_messages(messages: Any) -> None:
    """Check ``messages`` is a non-empty list of ``{"role": str, "content": str}`` mappings.

    ``content`` may be ``None`` on a message that carries ``tool_calls`` (an assistant turn
    that only calls tools).  Raises :class:`ChatTemplateError` (``param="messages"``) naming
    the first offending message.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatTemplateError(
            f"messages must be a list, got {type(messages).__name__}", param="messages"
        )
    if not messages:
        raise ChatTemplateError("messages must not be empty", param="messages")
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatTemplateError(
                f"messages[{index}] must be an object, got {type(message).__name__}",
                param="messages",
            )
        role = message.get("role")
        if not isinstance(role, str):
            raise ChatTemplateError(
                f"messages[{index}].role must be a string, got {type(role).__name__}",
                param="messages",
            )
        content = message.get("content")
        if isinstance(content, str) or (content is None and message.get("tool_calls")):
            continue
        raise ChatTemplateError(
            f"messages[{index}].content must be a string, got {type(content).__name__}",
            param="messages",
        )
