"""Structured outputs: constraining what a request may generate (JSON schema, JSON object,
regex, choice, Lark or GBNF grammar), on llguidance.

* :mod:`.spec` — :class:`StructuredOutput`, the constraint as plain data (in ``SamplingParams``);
* :mod:`.compiler` — :class:`GrammarCompiler`, constraint -> per-request matcher (the engine's);
* :mod:`.matcher` — :class:`GrammarMatcher` (a request's grammar state, advanced by the engine),
  :class:`MaskFiller` (a step's token bitmask, the model runner's) and :func:`apply_bitmask`
  (the sampler's).
"""

from rocmforge.structured.spec import StructuredOutput

__all__ = ["StructuredOutput"]
