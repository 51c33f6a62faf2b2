"""Reasoning ("thinking") text: separating it from the answer, whole or streamed.

Think-tag models (Qwen3, QwQ, DeepSeek-R1 and its distills) write their reasoning between
``<think>`` and ``</think>`` before the answer. The reply's ``reasoning_content`` is the text
between the tags (stripped) and ``content`` what follows the closing tag. A reply that starts
without the opening tag is all answer, unless the prompt itself ended inside a think block
(templates that open it for the model, as R1's do): then everything up to ``</think>`` is
reasoning, and a reply that never closes it (cut off by ``max_tokens``) is all reasoning.

One rule serves streamed and whole outputs (:func:`ReasoningFormat.split`): what a stream
sends is always a prefix of the final split, so its deltas concatenate to the non-streamed
answer. A server has one format (``--reasoning-parser``; ``auto``: think tags when the chat
template writes them, none otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass

from rocmforge.server.tool_calls.base import marker_prefix

__all__ = ["ReasoningFormat", "ReasoningStream", "reasoning_format"]

_WHITESPACE = " \t\n\r"


@dataclass(frozen=True, slots=True)
class ReasoningFormat:
    open: str = "<think>"
    close: str = "</think>"

    def starts_inside(self, prompt_tail: str) -> bool:
        """Whether a prompt ending in ``prompt_tail`` leaves the model inside a think block:
        the template's last words open one (R1's ``<think>\n``). A ``<think>`` earlier in the
        tail is a user's text, not the template's."""
        return prompt_tail.rstrip(_WHITESPACE).endswith(self.open)

    def split(self, text: str, inside: bool, *, final: bool = True) -> tuple[str | None, str]:
        """``(reasoning, content)`` of an output (module docstring); reasoning is None when
        the output has none. With ``final`` False the output may go on: both parts are then
        what is sure so far (a tail that may begin the closing tag, or be whitespace before
        it, is held back)."""
        start = 0
        if not inside:
            begin = len(text) - len(text.lstrip(_WHITESPACE))
            if text.startswith(self.open, begin):
                start = begin + len(self.open)
            elif not final and self.open.startswith(text[begin:]):
                return None, ""  # may still open
            else:
                return None, text
        end = text.find(self.close, start)
        if end >= 0:
            return text[start:end].strip(_WHITESPACE), text[end + len(self.close):].lstrip(_WHITESPACE)
        reasoning = text[start:].lstrip(_WHITESPACE)
        if final:
            return reasoning.rstrip(_WHITESPACE), ""
        reasoning = reasoning[:len(reasoning) - marker_prefix(reasoning, self.close)]
        return reasoning.rstrip(_WHITESPACE), ""


class ReasoningStream:
    """One choice's output split into reasoning and content deltas as it arrives."""

    def __init__(self, fmt: ReasoningFormat, inside: bool) -> None:
        self._fmt = fmt
        self._inside = inside
        self._text = ""
        self._reasoning = 0
        self._content = 0

    def feed(self, delta: str) -> tuple[str, str]:
        """``(reasoning delta, content delta)``: what the new text makes sure."""
        self._text += delta
        return self._advance(final=False)

    def finish(self) -> tuple[str, str]:
        """The rest, at the end of the output."""
        return self._advance(final=True)

    def _advance(self, *, final: bool) -> tuple[str, str]:
        reasoning, content = self._fmt.split(self._text, self._inside, final=final)
        reasoning = reasoning or ""
        new = reasoning[self._reasoning:], content[self._content:]
        self._reasoning, self._content = max(self._reasoning, len(reasoning)), max(self._content, len(content))
        return new


def reasoning_format(name: str, template_source: str | None) -> ReasoningFormat | None:
    """The format ``name`` selects; ``auto``: think tags when the template writes both."""
    if name == "none":
        return None
    if name == "think":
        return ReasoningFormat()
    if name == "auto":
        fmt = ReasoningFormat()
        source = template_source or ""
        return fmt if fmt.open in source and fmt.close in source else None
    raise ValueError(f"unknown reasoning parser {name!r}")
