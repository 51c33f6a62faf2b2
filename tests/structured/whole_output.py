"""A helper of the structured-output tests (a module of its own, so test modules import it)."""

from __future__ import annotations

from rocmforge.structured import StructuredOutput
from rocmforge.structured.compiler import GrammarCompiler
from rocmforge.tokenizer import Tokenizer


def accepts_whole(compiler: GrammarCompiler, tokenizer: Tokenizer, spec: StructuredOutput, text: str) -> bool:
    """Whether the constraint takes ``text`` (in the tokenizer's encoding) as a whole output:
    every token accepted, and then the grammar complete or a stop token allowed."""
    matcher = compiler.matcher(spec)
    return all(matcher.accept(t) for t in tokenizer.encode(text)) and (
        matcher.is_finished or any(matcher.allows(t) for t in tokenizer.stop_ids))
