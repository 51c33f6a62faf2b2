"""Batched next-token sampling.

In: fp32 logits ``[B, vocab]`` for the rows that sample this step, and a
:class:`SamplingBatch` describing each row's parameters (built by the model runner from the
requests' :class:`~rocmforge.sampling_params.SamplingParams`). Out: one token id per row and,
when asked, the chosen token's log-probability with the top-n alternatives.

Order of operations (as vLLM/HF): penalties -> logit bias -> stop tokens masked while a request is
below its ``min_tokens`` -> the structured-output mask -> greedy argmax or (temperature -> top-k ->
top-p -> min-p -> draw). Log-probabilities are those of the raw model distribution.
Random draws use the exponential-race trick (``argmax(p / Exp(1))``, gpt-fast), with a
per-request ``torch.Generator`` for seeded requests, so a seeded request draws the same
numbers whatever it is batched with. The caller moves the result to the host once per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rocmforge.device import to_device
from rocmforge.sampling_params import SamplingParams
from rocmforge.structured.matcher import apply_bitmask


@dataclass(slots=True)
class SamplingBatch:
    params: list[SamplingParams]
    prompt_ids: list[list[int]]
    output_ids: list[list[int]]
    generators: list[torch.Generator | None]
    """Per row: the request's own generator when it has a seed, else None."""
    suppressed: list[frozenset[int]]
    """Per row: token ids that must not be drawn (stop tokens before ``min_tokens``)."""
    allowed: torch.Tensor | None = None
    """``[B, ceil(vocab / 32)]`` int32 on the CPU: the structured-output bitmask (bit ``t % 32``
    of word ``t // 32`` set: token ``t`` may be drawn; unconstrained rows all ones), or None."""


@dataclass(slots=True)
class SamplerOutput:
    token_ids: torch.Tensor
    """[B] int64, on the logits' device."""
    logprobs: torch.Tensor | None = None
    """[B, 1 + n] fp32: the sampled token's logprob, then the top-n logprobs."""
    top_ids: torch.Tensor | None = None
    """[B, n] int64: the top-n token ids (best first)."""


class Sampler:
    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        params = batch.params
        raw_logits = logits
        logits = apply_penalties(logits, batch)
        if any(p.logit_bias for p in params):
            rows = [i for i, p in enumerate(params) for _ in p.logit_bias]
            cols = [token for p in params for token, _ in p.logit_bias]
            biases = [bias for p in params for _, bias in p.logit_bias]
            logits = logits.index_put(
                (to_device(rows, logits.device), to_device(cols, logits.device)),
                to_device(biases, logits.device, logits.dtype), accumulate=True,
            )
        if any(batch.suppressed):
            rows = [i for i, ids in enumerate(batch.suppressed) for _ in ids]
            cols = [t for ids in batch.suppressed for t in ids]
            logits = logits.index_put(
                (to_device(rows, logits.device), to_device(cols, logits.device)),
                torch.full((), float("-inf"), device=logits.device),
            )

        if batch.allowed is not None:
            logits = apply_bitmask(logits, batch.allowed)

        greedy_rows = [p.greedy for p in params]
        tokens = logits.argmax(dim=-1)
        if not all(greedy_rows):
            sampled = _sample(logits, params, batch.generators)
            is_greedy = to_device(greedy_rows, logits.device)
            tokens = torch.where(is_greedy, tokens, sampled)

        num_top = max((p.logprobs or 0) for p in params)
        if not any(p.logprobs is not None for p in params):
            return SamplerOutput(token_ids=tokens)
        logprobs = torch.log_softmax(raw_logits.float(), dim=-1)
        chosen = logprobs.gather(1, tokens[:, None])
        top_values, top_ids = logprobs.topk(num_top, dim=-1)
        return SamplerOutput(
            token_ids=tokens,
            logprobs=torch.cat([chosen, top_values], dim=1),
            top_ids=top_ids,
        )


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Repetition (prompt + output), presence and frequency (output only) penalties."""
    params = batch.params
    needs_rep = any(p.repetition_penalty != 1.0 for p in params)
    needs_additive = any(p.presence_penalty or p.frequency_penalty for p in params)
    if not (needs_rep or needs_additive):
        return logits
    logits = logits.clone()
    rows, vocab = logits.shape
    device = logits.device
    if needs_rep:
        seen = torch.zeros(rows, vocab, dtype=torch.bool, device=device)
        for i, (prompt, output) in enumerate(zip(batch.prompt_ids, batch.output_ids)):
            seen[i, to_device(prompt + output, device, torch.int64)] = True
        penalty = to_device([p.repetition_penalty for p in params], device)[:, None]
        penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, penalized, logits)
    if needs_additive:
        counts = torch.zeros(rows, vocab, dtype=logits.dtype, device=device)
        for i, output in enumerate(batch.output_ids):
            if output:
                ids = to_device(output, device, torch.int64)
                counts[i].index_add_(0, ids, torch.ones(len(output), dtype=logits.dtype, device=device))
        frequency = to_device([p.frequency_penalty for p in params], device)[:, None]
        presence = to_device([p.presence_penalty for p in params], device)[:, None]
        logits = logits - frequency * counts - presence * (counts > 0).to(logits.dtype)
    return logits


def _sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> torch.Tensor:
    device = logits.device
    temperature = to_device([p.temperature if p.temperature > 0 else 1.0 for p in params], device)
    logits = logits / temperature[:, None]
    if any(p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0 for p in params):
        logits = _filter(logits, params)
    probs = torch.softmax(logits, dim=-1)
    noise = _exponential_noise(probs, generators)
    return (probs / noise).argmax(dim=-1)


def _filter(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Mask (to -inf) what top-k, top-p and min-p exclude; the best token always survives."""
    device = logits.device
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=device)[None, :]

    top_k = to_device([p.top_k if p.top_k > 0 else vocab for p in params], device)[:, None]
    remove = rank >= top_k
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))

    probs = torch.softmax(sorted_logits, dim=-1)
    top_p = to_device([p.top_p for p in params], device)[:, None]
    mass_before = probs.cumsum(dim=-1) - probs
    remove |= mass_before >= top_p

    min_p = to_device([p.min_p for p in params], device)[:, None]
    remove |= probs < min_p * probs[:, :1]

    remove[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def _exponential_noise(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    noise = torch.empty_like(probs)
    if all(g is None for g in generators):
        noise.exponential_()
    else:
        for i, generator in enumerate(generators):
            noise[i].exponential_(generator=generator)
    # An exact 0 draw would turn a masked token's 0 / 0 into NaN, which argmax prefers.
    return noise.clamp_(min=torch.finfo(noise.dtype).tiny)
