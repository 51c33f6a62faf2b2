"""BPE merge lists: parsed from GGUF ``"a b"`` strings, or derived from SentencePiece scores.

In: the vocabulary (token text -> id) and either ``tokenizer.ggml.merges`` or the per-token
``tokenizer.ggml.scores``.  Out: ``[(left, right), ...]`` best merge first, as
``tokenizers.models.BPE`` takes them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from rocmforge.errors import TokenizerError


def parse_merges(merges: Sequence[str], vocab: Mapping[str, int]) -> list[tuple[str, str]]:
    """Split each ``"left right"`` merge and check both halves and the result are tokens.

    Splits at the first space after the first character, as llama.cpp does, so a left half
    may itself start with a space.  A malformed merge or one naming a token that is not in
    the vocabulary raises :class:`TokenizerError` naming the merge.
    """
    pairs: list[tuple[str, str]] = []
    for index, merge in enumerate(merges):
        cut = merge.find(" ", 1)
        if cut < 0:
            raise TokenizerError(
                f"BPE merge #{index} {merge!r} is not two tokens separated by a space",
                param="tokenizer.ggml.merges",
            )
        left, right = merge[:cut], merge[cut + 1 :]
        for part in (left, right, left + right):
            if part not in vocab:
                raise TokenizerError(
                    f"BPE merge #{index} {merge!r} refers to {part!r}, which is not in the "
                    "vocabulary",
                    param="tokenizer.ggml.merges",
                )
        pairs.append((left, right))
    return pairs


def merges_from_scores(
    tokens: Sequence[str], scores: Sequence[float], vocab: Mapping[str, int]
) -> list[tuple[str, str]]:
    """Merges implied by a SentencePiece vocabulary (as HF's ``SentencePieceExtractor``).

    Every token ``a + b`` whose two halves are both tokens yields the merge ``(a, b)``; the
    merges are ranked by the score of the merged token, best first (ties: longer left half,
    then longer right half, then vocabulary order).  Applying them lowest-rank-first is what
    llama.cpp's SentencePiece tokenizer does when it repeatedly merges the adjacent pair
    whose result scores highest.
    """
    by_token = dict(zip(tokens, scores, strict=True))  # a duplicate keeps its last score, as in HF
    ranked: list[tuple[str, str, float]] = []
    for merged, score in by_token.items():
        local = [
            (merged[:cut], merged[cut:], score)
            for cut in range(1, len(merged))
            if merged[:cut] in vocab and merged[cut:] in vocab
        ]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        ranked.extend(local)
    ranked.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in ranked]
