"""A slow numpy model of the native kernels' integer arithmetic, written from the block
layouts (tests/gguf_blocks.py, kernels.h) independently of the C++ code.

Activations: per block of 32 (BlockQ8) or 256 (BlockQ8K) values, ``d = max|x| / 127`` in
float32, ``q = rint(x * (1 / d))`` (ties to even), ``s = d * sum(q)`` (BlockQ8), and sums of
16 and ``d *`` sums of 32 (BlockQ8K). Dot products: exact integer sums per (sub-)block, scaled in float.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Q8Blocks:
    """Quantized activations of one row: ``d [nb]``, ``qs [nb, block]`` int32, ``s [nb]``
    (BlockQ8) or ``bsums [nb, block // 16]`` and ``dsums [nb, block // 32]`` (BlockQ8K:
    ``d * `` the sums of 32)."""

    d: np.ndarray
    qs: np.ndarray
    s: np.ndarray | None = None
    bsums: np.ndarray | None = None
    dsums: np.ndarray | None = None


def quantize_row(x: np.ndarray, block: int) -> Q8Blocks:
    """float32 ``[k]`` -> 8-bit blocks of ``block`` (32 or 256) values."""
    blocks = x.astype(np.float32).reshape(-1, block)
    d = (np.abs(blocks).max(axis=1) / np.float32(127)).astype(np.float32)
    inv = np.where(d != 0, np.float32(1) / np.where(d != 0, d, np.float32(1)), np.float32(0)).astype(np.float32)
    qs = np.rint(blocks * inv[:, None]).astype(np.int32)
    if block == 32:
        return Q8Blocks(d=d, qs=qs, s=(d * qs.sum(axis=1).astype(np.float32)).astype(np.float32))
    bsums = qs.reshape(len(d), -1, 16).sum(axis=2)
    dsums = (d[:, None] * bsums.reshape(len(d), -1, 2).sum(axis=2).astype(np.float32)).astype(np.float32)
    return Q8Blocks(d=d, qs=qs, bsums=bsums, dsums=dsums)


def unpack_q8(raw: np.ndarray, block: int) -> Q8Blocks:
    """The extension's activation bytes of one row -> the same fields (to compare with
    :func:`quantize_row`)."""
    if block == 32:
        rec = raw.view(np.dtype([("d", "<f4"), ("s", "<f4"), ("qs", "i1", 32)]))
        return Q8Blocks(d=rec["d"].copy(), qs=rec["qs"].astype(np.int32), s=rec["s"].copy())
    rec = raw.view(np.dtype([("d", "<f4"), ("qs", "i1", 256), ("bsums", "<i2", 16), ("dsums", "<f4", 8)]))
    return Q8Blocks(
        d=rec["d"].copy(), qs=rec["qs"].astype(np.int32), bsums=rec["bsums"].astype(np.int32), dsums=rec["dsums"].copy()
    )
