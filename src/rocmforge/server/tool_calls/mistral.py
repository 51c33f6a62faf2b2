"""The Mistral format, after the ``[TOOL_CALLS]`` control token, in either of its two
generations: a JSON array ``[{"name": ..., "arguments": {...}}, ...]`` (Mistral 7B v0.3,
Nemo, Small 2409 and other v3 tokenizers), or ``name[ARGS]{...}`` once per call, each after
its own ``[TOOL_CALLS]`` (v11 and later: Small 3.2, Magistral, Devstral; ``[CALL_ID]id`` may
come between). Both are read whatever the template; calls are written (history, forced
calls) in the template's generation. Mistral's templates insist on call ids of nine letters
and digits, so calls get such ids."""

from __future__ import annotations

import json
import re
import secrets
import string
from collections.abc import Sequence
from typing import Any

from rocmforge.server.tool_calls.base import TokenLookup, ToolFormat, call_schema, lark_token, marker_prefix
from rocmforge.server.tool_calls.json_scan import PartialCall, scan_call_object, skip_space, value_end
from rocmforge.structured.compiler import JSON_OPTIONS, closed_schema

TOOL_CALLS, ARGS, CALL_ID = "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"
_NAME = re.compile(r"[A-Za-z0-9_.-]*")
_ID_ALPHABET = string.ascii_letters + string.digits


class MistralFormat(ToolFormat):
    """Calls after ``[TOOL_CALLS]``, in either generation (module docstring)."""

    name = "mistral"
    control_tokens = (TOOL_CALLS, ARGS, CALL_ID)

    def __init__(self, *, args_marker: bool = False) -> None:
        self.args_marker = args_marker
        """Write calls as ``[TOOL_CALLS]name[ARGS]{...}`` (v11+) instead of a JSON array."""

    def new_call_id(self) -> str:
        return "".join(secrets.choice(_ID_ALPHABET) for _ in range(9))

    def start(self, text: str) -> int:
        return text.find(TOOL_CALLS)

    def holdback(self, text: str) -> int:
        return marker_prefix(text, TOOL_CALLS)

    def scan(self, region: str) -> list[PartialCall]:
        index = skip_space(region, len(TOOL_CALLS))
        if index < len(region) and region[index] == "[":
            return _scan_array(region, index + 1)
        calls: list[PartialCall] = []
        while True:
            call, index = _scan_named(region, index)
            calls.append(call)
            if not call.complete:
                return calls
            index = skip_space(region, index)
            if not region.startswith(TOOL_CALLS, index):
                return calls  # what follows the last call is dropped
            index = skip_space(region, index + len(TOOL_CALLS))

    def render_calls(self, calls: Sequence[tuple[str, Any]]) -> str:
        if self.args_marker:
            return "".join(f"{TOOL_CALLS}{name}{ARGS}{json.dumps(arguments, ensure_ascii=False)}"
                           for name, arguments in calls)
        body = [{"name": name, "arguments": arguments} for name, arguments in calls]
        return f"{TOOL_CALLS}{json.dumps(body, ensure_ascii=False)}"

    def grammar(self, tools: Sequence[dict[str, Any]], parallel: bool, tokens: TokenLookup) -> str:
        marker = lark_token(TOOL_CALLS, tokens)
        if self.args_marker:
            names = " | ".join(f"named_{i}" for i in range(len(tools)))
            rules = "".join(
                f"named_{i}: {json.dumps(tool['function']['name'])} {lark_token(ARGS, tokens)} args_{i}\n"
                f"args_{i}: %json {json.dumps(_arguments_schema(tool), ensure_ascii=False)}\n"
                for i, tool in enumerate(tools))
            repeat = " call*" if parallel else ""
            return f"start: call{repeat}\ncall: {marker} ({names})\n{rules}"
        repeat = ' (", " body)*' if parallel else ""
        return (f'start: {marker} "[" body{repeat} "]"\n'
                f"body: %json {json.dumps(call_schema(tools), ensure_ascii=False)}\n")


def _arguments_schema(tool: dict[str, Any]) -> dict[str, Any]:
    return {**closed_schema(tool["function"].get("parameters") or {"type": "object"}), "x-guidance": JSON_OPTIONS}


def _scan_array(region: str, index: int) -> list[PartialCall]:
    calls: list[PartialCall] = []
    while True:
        index = skip_space(region, index)
        if index >= len(region) or region[index] == "]":
            return calls
        call, index = scan_call_object(region, index)
        calls.append(call)
        if not call.complete:
            return calls
        index = skip_space(region, index)
        if index < len(region):
            if region[index] == ",":
                index += 1
            elif region[index] != "]":
                raise ValueError("expected ',' or ']'")


def _scan_named(region: str, index: int) -> tuple[PartialCall, int]:
    """``name[ARGS]{...}`` (or ``name[CALL_ID]id[ARGS]{...}``) from ``index``."""
    name_end = _NAME.match(region, index).end()  # type: ignore[union-attr]  # matches the empty name
    rest = region[name_end:]
    if not rest or (ARGS.startswith(rest) or CALL_ID.startswith(rest)):
        return PartialCall(), len(region)  # the name may go on
    call = PartialCall(name=region[index:name_end] or None)
    if call.name is None:
        raise ValueError("a call without a name")
    index = name_end
    if region.startswith(CALL_ID, index):
        args_at = region.find(ARGS, index)
        if args_at < 0:
            return PartialCall(), len(region)  # announced with its name once the id is read
        index = args_at
    if not region.startswith(ARGS, index):
        raise ValueError(f"expected {ARGS}")
    start = skip_space(region, index + len(ARGS))
    if start < len(region) and region[start] != "{":
        raise ValueError("the arguments are not an object")
    end = value_end(region, start)
    call.arguments = region[start:] if end is None else region[start:end]
    call.complete = end is not None
    return call, len(region) if end is None else end
