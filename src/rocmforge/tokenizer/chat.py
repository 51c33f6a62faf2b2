"""Chat templates: a model's Jinja template rendered the way HF ``apply_chat_template`` does.

In: the template source (``tokenizer.chat_template``) and its :class:`TemplateLimits`, and
per request a list of messages (each a mapping with a string ``role`` and string
``content``) plus template variables.  Out: the prompt text, control tokens written out as
text (:meth:`~rocmforge.tokenizer.Tokenizer.encode_chat` turns it into ids so that control
tokens come only from the template).

The template is untrusted code from a model file.  It runs in Jinja's immutable sandbox
(:mod:`.template_sandbox`: no attribute access to internals, no mutation of the messages;
unlike Jinja's default, touching an unsafe attribute raises instead of rendering as empty)
and under a budget (:mod:`.template_limits`): a deadline, a number of loop iterations and
macro calls, a size limit on the output and on every value it builds, and a total of what
it may allocate.  The environment matches HF's: ``trim_blocks``, ``lstrip_blocks``,
``loopcontrols``, the ``{% generation %}`` tag, ``raise_exception``, ``strftime_now`` and a
``tojson`` that does not HTML-escape.  The output is consumed chunk by chunk, so its size
and the deadline are checked as it grows.

Every failure -- syntax, runtime, sandbox, a limit hit (the message names it, and
``details["limit"]`` holds it), memory, recursion, invalid messages, text that is not valid
Unicode -- is a :class:`~rocmforge.errors.ChatTemplateError` with the cause chained.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jinja2
from jinja2.exceptions import SecurityError

from rocmforge.errors import ChatTemplateError
from rocmforge.tokenizer.chat_inputs import scan_strings
from rocmforge.tokenizer.template_limits import (
    BudgetExceeded,
    RenderBudget,
    TemplateLimits,
    budget_scope,
)
from rocmforge.tokenizer.template_sandbox import TemplateRaised, sandbox_environment
from rocmforge.tokenizer.unicode_text import find_lone_surrogate, invalid_unicode_message


class ChatTemplate:
    """A compiled chat template.  Compiling happens here, so a broken template fails early."""

    limits: TemplateLimits
    """What each render may spend; assign another :class:`TemplateLimits` to change it."""

    def __init__(
        self,
        source: str,
        *,
        bos_token: str = "",
        eos_token: str = "",
        limits: TemplateLimits | None = None,
    ) -> None:
        """Compile ``source``; ``bos_token``/``eos_token`` are the texts templates see by default.

        Raises :class:`ChatTemplateError` when the source is not a valid template.
        """
        if not isinstance(source, str):
            raise ChatTemplateError(f"chat template must be a string, got {type(source).__name__}")
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.limits = limits if limits is not None else TemplateLimits()
        self._template = _compile(source)

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
        Raises :class:`ChatTemplateError` for invalid messages, strings that are not valid
        Unicode, or when the template fails or goes over a limit, including when it calls
        ``raise_exception`` (the template's message is kept).
        """
        validate_messages(messages)
        input_chars = scan_strings(messages, "messages")
        for name, value in extra.items():
            input_chars += scan_strings(value, name)
        variables = {
            **extra,
            "messages": list(messages),
            "add_generation_prompt": add_generation_prompt,
            "bos_token": self.bos_token if bos_token is None else bos_token,
            "eos_token": self.eos_token if eos_token is None else eos_token,
        }
        text = self._run(variables, input_chars)
        index = find_lone_surrogate(text)
        if index is not None:
            message = invalid_unicode_message("the rendered chat prompt", text, index)
            raise ChatTemplateError(message)
        return text

    def __repr__(self) -> str:
        return f"ChatTemplate({len(self.source)} chars, {self.limits})"

    def _run(self, variables: dict[str, Any], input_chars: int) -> str:
        try:
            with budget_scope(self.limits, input_chars) as budget:
                return _collect(self._template.generate(**variables), budget)
        except BudgetExceeded as exc:
            raise ChatTemplateError(str(exc), limit=exc.limit) from exc
        except TemplateRaised as exc:
            raise ChatTemplateError(f"chat template rejected the conversation: {exc}") from exc
        except SecurityError as exc:
            raise ChatTemplateError(f"chat template violated the sandbox: {exc}") from exc
        except RecursionError as exc:
            raise ChatTemplateError(
                f"chat template exceeded its recursion limit: {exc}", limit="recursion"
            ) from exc
        except MemoryError as exc:
            raise ChatTemplateError(
                "chat template exceeded the memory available while rendering", limit="memory"
            ) from exc
        except Exception as exc:  # untrusted code: any other error is the template's failure
            raise ChatTemplateError(f"chat template failed: {type(exc).__name__}: {exc}") from exc


def _compile(source: str) -> jinja2.Template:
    try:
        return sandbox_environment().from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(
            f"chat template has a syntax error at line {exc.lineno}: {exc.message}"
        ) from exc
    except (RecursionError, MemoryError) as exc:
        raise ChatTemplateError(
            f"chat template is too deeply nested to compile: {type(exc).__name__}"
        ) from exc
    except Exception as exc:  # untrusted source: whatever the compiler raises is its failure
        raise ChatTemplateError(
            f"chat template cannot be compiled: {type(exc).__name__}: {exc}"
        ) from exc


def _collect(stream: Iterator[str], budget: RenderBudget) -> str:
    """Join the render's output, checking its size and the deadline at every chunk."""
    parts: list[str] = []
    size = 0
    try:
        for chunk in stream:
            size += len(chunk)
            budget.check_size(size, "the rendered prompt")
            budget.check_time()
            parts.append(chunk)
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
    return "".join(parts)


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
