"""Pre-tokenizer regexes for byte-level BPE vocabularies, keyed by ``tokenizer.ggml.pre``.

In: the ``tokenizer.ggml.pre`` string of a GGUF file (``"smollm"``, ``"llama-bpe"``, ...).
Out: a :class:`PreTokenizerSpec` -- the regexes that cut text into words before BPE runs
(applied one after the other, each on the pieces the previous one produced, unmatched text
kept as its own piece), whether whole words found in the vocabulary skip the merges, and
whether a BOS token is added when the file does not say.

The table mirrors llama.cpp's ``llm_tokenizer_bpe`` (``src/llama-vocab.cpp``): the same
names map to the same regex families.  The one deliberate difference is ``"default"`` (and
anything unknown): llama.cpp uses an odd four-regex cascade there, while HF transformers'
GGUF loader and every real model that names no pre-tokenizer mean plain GPT-2, so we use the
GPT-2 regex.  Adding a model is adding a row, not a branch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

logger = logging.getLogger(__name__)

# The GPT-2 regex, as HF tokenizers' ByteLevel pre-tokenizer spells it.
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# Llama 3: case-insensitive contractions, a word takes one leading non-letter, numbers in
# groups of up to three digits, newlines kept together.
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen 2: the Llama 3 regex, but every digit on its own.
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SINGLE_DIGIT_REGEX = r"\p{N}"
FALCON_PUNCT_REGEX = r"[\p{P}\$\+<=>\^~\|`]+"
THREE_DIGITS_REGEX = r"[0-9][0-9][0-9]"


@dataclass(frozen=True, slots=True)
class PreTokenizerSpec:
    """How one family of byte-level vocabularies splits text before BPE."""

    name: str
    """The family name (for logs)."""
    regexes: tuple[str, ...]
    """Applied in order with ``behavior="isolated"``; each splits the previous one's pieces."""
    ignore_merges: bool = False
    """A word that is itself a vocabulary token is emitted whole, without running merges."""
    add_bos: bool = False
    """Whether to add BOS when ``tokenizer.ggml.add_bos_token`` is absent."""


_GPT2 = PreTokenizerSpec("gpt2", (GPT2_REGEX,))
_LLAMA3 = PreTokenizerSpec("llama3", (LLAMA3_REGEX,), ignore_merges=True, add_bos=True)
_LLAMA3_MERGING = PreTokenizerSpec("llama3-merging", (LLAMA3_REGEX,))
_STARCODER = PreTokenizerSpec("starcoder", (SINGLE_DIGIT_REGEX, GPT2_REGEX))
_QWEN2 = PreTokenizerSpec("qwen2", (QWEN2_REGEX,))
_FALCON = PreTokenizerSpec("falcon", (FALCON_PUNCT_REGEX, GPT2_REGEX, THREE_DIGITS_REGEX))

DEFAULT_PRE = "default"

PRE_TOKENIZERS: dict[str, PreTokenizerSpec] = {
    # GPT-2 family
    "default": _GPT2,
    "gpt2": _GPT2,
    "gpt-2": _GPT2,
    "phi-2": _GPT2,
    "mpt": _GPT2,
    "olmo": _GPT2,
    "jais": _GPT2,
    "roberta-bpe": _GPT2,
    "gigachat": _GPT2,
    "jina-es": _GPT2,
    "jina-de": _GPT2,
    "jina-v1-en": _GPT2,
    "jina-v2-es": _GPT2,
    "jina-v2-de": _GPT2,
    "jina-v2-code": _GPT2,
    # Llama 3 family (llama.cpp sets ignore_merges and add_bos for these names only)
    "llama3": _LLAMA3,
    "llama-v3": _LLAMA3,
    "llama-bpe": _LLAMA3,
    "falcon3": _LLAMA3,
    "dbrx": _LLAMA3_MERGING,
    "smaug-bpe": _LLAMA3_MERGING,
    # digits one by one, then GPT-2
    "smollm": _STARCODER,
    "starcoder": _STARCODER,
    "refact": _STARCODER,
    "command-r": _STARCODER,
    "codeshell": _STARCODER,
    "exaone": _STARCODER,
    "minerva-7b": _STARCODER,
    # Qwen 2 family
    "qwen2": _QWEN2,
    "stablelm2": _QWEN2,
    "megrez": _QWEN2,
    "deepseek-r1-qwen": _QWEN2,
    # Falcon
    "falcon": _FALCON,
}


def pre_tokenizer_spec(pre: str | None) -> PreTokenizerSpec:
    """The spec for a ``tokenizer.ggml.pre`` value; unknown or missing values get GPT-2.

    A fallback is logged as a warning: the vocabulary will still round-trip, but words may
    be cut differently from how the model was trained, which costs quality.
    """
    if pre is None:
        logger.warning("GGUF has no tokenizer.ggml.pre; using the %r pre-tokenizer", DEFAULT_PRE)
        return PRE_TOKENIZERS[DEFAULT_PRE]
    spec = PRE_TOKENIZERS.get(pre)
    if spec is None:
        logger.warning(
            "unknown tokenizer.ggml.pre %r; falling back to the %r pre-tokenizer "
            "(tokenization may differ from the model's training)",
            pre,
            DEFAULT_PRE,
        )
        return PRE_TOKENIZERS[DEFAULT_PRE]
    return spec
