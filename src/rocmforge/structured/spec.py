"""What a request's output must match: one constraint, as plain data.

Flows in from the Python API (``SamplingParams(structured=StructuredOutput(...))``) and from
the HTTP routes (``response_format``, ``grammar``, ``regex``, ``choice``); flows out to the
:class:`~rocmforge.structured.compiler.GrammarCompiler`, which turns it into a matcher. It is
frozen and hashable (the JSON schema is kept as compact JSON text), so equal constraints
share one compiled grammar.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from rocmforge.errors import InvalidGrammarError

MAX_SPEC_BYTES = 1 << 20
"""The longest schema, regex or grammar text one request may carry."""


@dataclass(frozen=True, slots=True)
class StructuredOutput:
    """Exactly one of the fields is set.

    * ``json``: a JSON schema (a dict, or its JSON text): the output is one JSON value that
      validates against it;
    * ``json_object``: any JSON object;
    * ``regex``: the whole output matches the regular expression (Rust ``regex`` syntax, with
      ``\\d`` and ``\\w`` meaning ASCII digits and word characters, as in JSON Schema patterns);
    * ``choice``: the output is exactly one of the strings;
    * ``grammar``: a context-free grammar, in Lark syntax (llguidance's dialect, with
      ``start:`` as its first rule) or in llama.cpp's GBNF (``root ::= ...``), told apart by
      their syntax.

    JSON is generated compactly (no whitespace beyond ``", "`` and ``": "``), which keeps a
    small model from drifting into endless indentation.
    """

    json: str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        if self.json is not None:
            object.__setattr__(self, "json", _schema_text(self.json))
        if self.choice is not None:
            if isinstance(self.choice, str) or not isinstance(self.choice, (list, tuple)):
                raise InvalidGrammarError("choice must be a list of strings", param="choice")
            object.__setattr__(self, "choice", tuple(self.choice))
            if not self.choice or not all(isinstance(c, str) and c for c in self.choice):
                raise InvalidGrammarError("choice must be a non-empty list of non-empty strings", param="choice")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise InvalidGrammarError(f"{name} must be a non-empty string", param=name)
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        if self.json_object:
            given.append("json_object")
        if len(given) != 1:
            what = "none" if not given else " and ".join(given)
            raise InvalidGrammarError(f"a structured output takes exactly one constraint, got {what}",
                                      param=given[1] if len(given) > 1 else None)
        if len(self.source.encode("utf-8")) > MAX_SPEC_BYTES:
            raise InvalidGrammarError(f"the {self.kind} is longer than {MAX_SPEC_BYTES} bytes", param=self.kind)

    @property
    def kind(self) -> str:
        """Which constraint this is: ``json``, ``json_object``, ``regex``, ``choice`` or ``grammar``."""
        if self.json_object:
            return "json_object"
        return next(name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None)

    @property
    def source(self) -> str:
        """The constraint as text (the schema's JSON, the regex, the grammar, the choices' JSON)."""
        if self.json_object:
            return '{"type": "object"}'
        if self.choice is not None:
            return json.dumps(list(self.choice), ensure_ascii=False)
        return str(getattr(self, self.kind))


def _schema_text(schema: Any) -> str:
    """The schema as compact JSON text, from a dict or from JSON text. Keys keep their order:
    the generated object lists its properties in the schema's order."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise InvalidGrammarError(f"the JSON schema is not valid JSON: {exc}", param="json") from None
        except RecursionError:
            raise InvalidGrammarError("the JSON schema is nested too deeply", param="json") from None
    if isinstance(schema, bool):
        schema = {} if schema else {"not": {}}
    if not isinstance(schema, dict):
        raise InvalidGrammarError(f"a JSON schema is an object, got {type(schema).__name__}", param="json")
    try:
        return json.dumps(schema, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise InvalidGrammarError(f"the JSON schema cannot be written as JSON: {exc}", param="json") from None
    except RecursionError:
        raise InvalidGrammarError("the JSON schema is nested too deeply", param="json") from None
