"""The Llama 3.1/3.2/3.3 JSON format (``llama3_json``): the whole reply is the call,
``{"name": ..., "parameters": {...}}`` (``arguments`` is read too), optionally after the
``<|python_tag|>`` control token; several calls are separated by ``;``. A reply that does not
begin with a call is text: the model never calls after writing prose."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from rocmforge.server.tool_calls.base import TokenLookup, ToolFormat, call_schema
from rocmforge.server.tool_calls.json_scan import PartialCall, scan_call_object, skip_space

PYTHON_TAG = "<|python_tag|>"
_KEYS = ("parameters", "arguments")


class Llama3JsonFormat(ToolFormat):
    """The reply is the call, as JSON (module docstring)."""

    name = "llama3_json"
    control_tokens = (PYTHON_TAG,)

    def start(self, text: str) -> int:
        begin = skip_space(text, 0)
        return begin if text.startswith(PYTHON_TAG, begin) or text.startswith("{", begin) else -1

    def holdback(self, text: str) -> int:
        rest = text[skip_space(text, 0):]
        return len(text) if PYTHON_TAG.startswith(rest) else 0  # "" too: nothing written yet

    def scan(self, region: str) -> list[PartialCall]:
        index = skip_space(region, len(PYTHON_TAG) if region.startswith(PYTHON_TAG) else 0)
        calls: list[PartialCall] = []
        while index < len(region):
            call, end = scan_call_object(region, index, argument_keys=_KEYS)
            calls.append(call)
            if not call.complete:
                return calls
            index = skip_space(region, end)
            if index < len(region):
                if region[index] != ";":
                    raise ValueError("calls are separated by ';'")
                index = skip_space(region, index + 1)
        return calls

    def render_calls(self, calls: Sequence[tuple[str, Any]]) -> str:
        return "; ".join(json.dumps({"name": name, "parameters": arguments}, ensure_ascii=False)
                         for name, arguments in calls)

    def grammar(self, tools: Sequence[dict[str, Any]], parallel: bool, tokens: TokenLookup) -> str:
        repeat = ' ("; " call)*' if parallel else ""
        return (f"start: call{repeat}\n"
                f"call: %json {json.dumps(call_schema(tools, 'parameters'), ensure_ascii=False)}\n")
