"""The Hermes format (Qwen2.5, Qwen3, Hermes 2/3 and most templates that render ``tools``):
``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` once per call, after any
text. Text after the last call is dropped, and a last call's closing tag may be missing
(the model stopped right after the object), as the families' own parsers have it."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from rocmforge.server.tool_calls.base import TokenLookup, ToolFormat, call_schema, marker_prefix
from rocmforge.server.tool_calls.json_scan import PartialCall, scan_call_object, skip_space

OPEN, CLOSE = "<tool_call>", "</tool_call>"


class HermesFormat(ToolFormat):
    """``<tool_call>`` blocks (module docstring)."""

    name = "hermes"

    def start(self, text: str) -> int:
        return text.find(OPEN)

    def holdback(self, text: str) -> int:
        return marker_prefix(text, OPEN)

    def scan(self, region: str) -> list[PartialCall]:
        calls: list[PartialCall] = []
        index = 0
        while region.startswith(OPEN, index):
            call, end = scan_call_object(region, skip_space(region, index + len(OPEN)))
            calls.append(call)
            if not call.complete:
                return calls
            index = skip_space(region, end)
            if index >= len(region) or CLOSE.startswith(region[index:]):
                return calls  # the closing tag is still to come (or left out before the end)
            if not region.startswith(CLOSE, index):
                raise ValueError(f"expected {CLOSE}")
            index = skip_space(region, index + len(CLOSE))
        return calls

    def render_calls(self, calls: Sequence[tuple[str, Any]]) -> str:
        return "\n".join(f'{OPEN}\n{json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)}\n{CLOSE}'
                         for name, arguments in calls)

    def grammar(self, tools: Sequence[dict[str, Any]], parallel: bool, tokens: TokenLookup) -> str:
        repeat = ' ("\\n" call)*' if parallel else ""
        return (f"start: call{repeat}\n"
                f'call: "{OPEN}\\n" body "\\n{CLOSE}"\n'
                f"body: %json {json.dumps(call_schema(tools), ensure_ascii=False)}\n")
