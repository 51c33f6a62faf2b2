"""GGUF block facts the tests need to make valid random blocks, written down from ggml's
block structs (``ggml-common.h``) independently of the code under test."""

from __future__ import annotations

import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

F16_FIELDS: dict[T, tuple[int, ...]] = {
    T.Q8_0: (0,),
    T.Q4_0: (0,),
    T.Q4_1: (0, 2),
    T.Q5_0: (0,),
    T.Q5_1: (0, 2),
    T.Q2_K: (80, 82),
    T.Q3_K: (108,),
    T.Q4_K: (0, 2),
    T.Q5_K: (0, 2),
    T.Q6_K: (208,),
}
"""Byte offsets of the fp16 fields (``d``, ``m``, ``dmin``) in one block of each type."""


def random_weight(qtype: T, n: int, k: int, seed: int) -> torch.Tensor:
    """uint8 ``[n, row_bytes]`` (CPU): ``n`` rows of ``k`` elements of random blocks of
    ``qtype``, every fp16 field +-[2^-10, 2^-7] (finite, moderate), every code byte random."""
    gen = torch.Generator().manual_seed(seed)
    block_elements, block_bytes = GGML_QUANT_SIZES[qtype]
    blocks = k // block_elements
    raw = torch.randint(0, 256, (n, blocks, block_bytes), dtype=torch.uint8, generator=gen)
    for offset in F16_FIELDS[qtype]:
        magnitude = torch.exp2(torch.empty(n, blocks).uniform_(-10, -7, generator=gen))
        sign = torch.randint(0, 2, (n, blocks), generator=gen) * 2 - 1
        halves = (magnitude * sign).to(torch.float16).view(torch.uint8)
        raw[:, :, offset : offset + 2] = halves.view(n, blocks, 2)
    return raw.reshape(n, blocks * block_bytes)
