"""Compiling structured-output constraints into grammar matchers, with llguidance.

In: a :class:`~rocmforge.structured.spec.StructuredOutput`. Out: a fresh
:class:`~rocmforge.structured.matcher.GrammarMatcher` per request, or
:class:`~rocmforge.errors.InvalidGrammarError` naming what does not compile (a schema that is
not valid or cannot be satisfied, a regex or grammar that does not parse).

Why llguidance (and not xgrammar): it has no dependencies (xgrammar pulls in transformers,
triton and a TVM runtime), builds a grammar in well under a millisecond for typical schemas
because its lexer is lazy (there is no per-schema compile to wait for or to cache), bounds the
work of each mask by explicit fuel limits, so a hostile grammar cannot stall a batch, reads
Lark and llama.cpp's GBNF, and computes a batch's masks on its own threads without the GIL.

Objects are closed by default: a schema object that lists ``properties`` (or
``patternProperties``) and says nothing of ``additionalProperties`` allows no other keys, as
vLLM and xgrammar do and as OpenAI's strict mode requires. JSON Schema would allow any extra
key, so a Pydantic model's schema would let the model append keys until ``max_tokens``. Say
``"additionalProperties": true`` to allow them. Integers are bounded by default the same
way: a side the schema leaves open is bounded at ±(2**53 - 1), JSON's safe integers (16
digits, about the cap of llama.cpp's JSON grammars), or a small model may write digits until
``max_tokens``.

One compiler serves an engine (one tokenizer). The llguidance tokenizer (the vocabulary as
bytes, built once, ~0.1 s for 49k tokens) is made on first use. Compiled grammars are kept
in a small LRU cache keyed by the constraint, and each request gets a copy: agents send the
same schemas turn after turn, and ``n`` choices share one compile (errors are cached too).
Thread-safe: the async engine compiles on worker threads, before a request is posted to the
engine thread, so a slow schema (a second, for thousands of patterned properties) delays
only its own request and a bad one is answered 400 before it is queued.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any

import llguidance

from rocmforge.errors import InvalidGrammarError
from rocmforge.structured.matcher import GrammarMatcher
from rocmforge.structured.spec import StructuredOutput
from rocmforge.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

CACHE_SIZE = 64
"""Compiles (grammars, or the errors they gave) kept for reuse."""
MAX_ERROR_CHARS = 1000
"""Longest grammar error passed on to the client."""
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
"""Compact JSON with the separators models have read most (Python's ``json.dumps``)."""
INTEGER_LIMIT = 2**53 - 1
"""Bound of an integer whose schema gives none: JSON's safe integers (what a double holds
exactly, so every client reads the value back), 16 digits, about the cap of llama.cpp's JSON
grammars. Without it a small model may write one digit after another until ``max_tokens``."""
_FORMATS = {"choice": "choice", "grammar": "grammar"}
_SUBSCHEMA = ("additionalProperties", "items", "not", "if", "then", "else", "contains", "propertyNames",
              "unevaluatedProperties", "unevaluatedItems", "additionalItems")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems", "items")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


@dataclass(slots=True)
class GrammarStats:
    """What the compiler did since it was made (the server exports it as metrics)."""

    requests: Counter[str] = field(default_factory=Counter)
    """Matchers handed out (constrained requests), by constraint kind."""
    compiles: int = 0
    """Constraints compiled (cache misses), successfully or not."""
    compile_errors: int = 0
    """Compiles that failed (the request was answered ``invalid_grammar``)."""
    compile_seconds: float = 0.0
    """Time spent compiling, all compiles together."""


class GrammarCompiler:
    """StructuredOutput -> GrammarMatcher for one tokenizer (module docstring)."""

    def __init__(self, tokenizer: Tokenizer, *, cache_size: int = CACHE_SIZE) -> None:
        self._tokenizer = tokenizer
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._cache: OrderedDict[StructuredOutput, llguidance.LLMatcher | InvalidGrammarError] = OrderedDict()
        self._compiling: dict[StructuredOutput, threading.Lock] = {}
        self._stats = GrammarStats()
        self._limits = llguidance.LLParserLimits(verbose_errors=False)

    @property
    def mask_words(self) -> int:
        """32-bit words of one token bitmask row (``ceil(vocab / 32)``)."""
        return (self._tokenizer.vocab_size + 31) // 32

    def stats(self) -> GrammarStats:
        """A copy of the counts so far."""
        with self._lock:
            stats = self._stats
            return GrammarStats(Counter(stats.requests), stats.compiles, stats.compile_errors, stats.compile_seconds)

    def matcher(self, spec: StructuredOutput) -> GrammarMatcher:
        """A fresh matcher for one request, at the start of the output; raises
        :class:`InvalidGrammarError` when ``spec`` does not compile."""
        compiled = self._compiled(spec)
        if isinstance(compiled, InvalidGrammarError):
            raise InvalidGrammarError(compiled.message, param=compiled.param)
        with self._lock:
            self._stats.requests[spec.kind] += 1
        return GrammarMatcher(compiled.deep_copy(), self.mask_words)

    def _compiled(self, spec: StructuredOutput) -> llguidance.LLMatcher | InvalidGrammarError:
        """The cached compile of ``spec``, a matcher or the error it gave (a client that
        sends a bad schema again, or ``n`` choices of one, is answered from the cache). One
        thread compiles a given spec at a time; the others wait for its result."""
        with self._lock:
            gate = self._compiling.setdefault(spec, threading.Lock())
        with gate:
            with self._lock:
                cached = self._cache.get(spec)
                if cached is not None:
                    self._cache.move_to_end(spec)
                    self._compiling.pop(spec, None)
                    return cached
            start = time.perf_counter()
            compiled = self._compile(spec)
            with self._lock:
                self._stats.compiles += 1
                self._stats.compile_errors += isinstance(compiled, InvalidGrammarError)
                self._stats.compile_seconds += time.perf_counter() - start
                self._cache[spec] = compiled
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
                self._compiling.pop(spec, None)
            return compiled

    def _compile(self, spec: StructuredOutput) -> llguidance.LLMatcher | InvalidGrammarError:
        try:
            grammar = _grammar(spec)
        except InvalidGrammarError as exc:
            return exc
        matcher = llguidance.LLMatcher(self._llg_tokenizer(), grammar, log_level=0, limits=self._limits)
        if matcher.is_error():
            return InvalidGrammarError(f"the {_NAMES[spec.kind]} does not compile: {_short(matcher.get_error())}",
                                       param=spec.kind)
        for warning in matcher.get_grammar_warnings():
            logger.debug("grammar warning: %s", warning)
        return matcher

    def _llg_tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._ll_tokenizer is None:
                self._ll_tokenizer = llguidance.LLTokenizer(
                    llguidance.TokenizerWrapper(_Vocabulary(self._tokenizer)),
                    eos_token=sorted(self._tokenizer.stop_ids),
                )
            return self._ll_tokenizer


_NAMES = {"json": "JSON schema", "json_object": "JSON object constraint", "regex": "regex",
          "choice": "choice list", "grammar": "grammar"}


def _grammar(spec: StructuredOutput) -> str:
    """The llguidance grammar text of ``spec``."""
    try:
        if spec.kind in ("json", "json_object"):
            schema = closed_schema(json.loads(spec.source))
            return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)  # type: ignore[arg-type]
        if spec.kind == "regex":
            # JSON Schema's (JavaScript's) meaning of \d and \w, ASCII, as schema patterns have
            return llguidance.LLMatcher.grammar_from_lark(f"start: /{llguidance.regex_to_lark(spec.source, 'dw')}/")
        return llguidance.grammar_from(_FORMATS[spec.kind], spec.source)  # type: ignore[arg-type]
    except RecursionError:
        raise InvalidGrammarError("the JSON schema is nested too deeply", param=spec.kind) from None
    except ValueError as exc:  # a GBNF grammar that does not convert, a schema that is no object
        raise InvalidGrammarError(f"the {_NAMES[spec.kind]} does not compile: {_short(str(exc))}",
                                  param=spec.kind) from None


def closed_schema(schema: Any) -> Any:
    """``schema`` (a parsed JSON schema) closed where it leaves sizes open (module
    docstring): ``additionalProperties: false`` on every object schema that lists properties
    and leaves it unsaid, and integers without bounds kept to ``±INTEGER_LIMIT``.
    Walks schema positions only, never ``enum`` or ``const`` values."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SUBSCHEMA:
        if isinstance(out.get(key), dict):
            out[key] = closed_schema(out[key])
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [closed_schema(item) for item in out[key]]
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: closed_schema(sub) for name, sub in out[key].items()}
    if ("properties" in out or "patternProperties" in out) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    if out.get("type") == "integer":
        if "minimum" not in out and "exclusiveMinimum" not in out:
            out["minimum"] = -INTEGER_LIMIT
        if "maximum" not in out and "exclusiveMaximum" not in out:
            out["maximum"] = INTEGER_LIMIT
    return out


def _short(message: str) -> str:
    message = message.strip()
    return message if len(message) <= MAX_ERROR_CHARS else message[:MAX_ERROR_CHARS] + " ..."


class _Vocabulary:
    """What ``llguidance.TokenizerWrapper`` reads: every token's bytes (control tokens marked
    with a leading 0xFF, llguidance's convention, so no text can spell them), the special
    ids, and a tokenize function that treats control-token text as plain text."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = tokenizer.bos_id
        self.special_token_ids = [i for i in range(tokenizer.vocab_size) if tokenizer.is_special(i)]
        special = set(self.special_token_ids)
        self.tokens = [(b"\xff" if i in special else b"") + tokenizer.token_bytes(i)
                       for i in range(tokenizer.vocab_size)]

    def __call__(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, parse_special=False)
