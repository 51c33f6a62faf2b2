"""GGUF block facts the tests need to make valid random blocks, written down from ggml's
block structs (``ggml-common.h``) independently of the code under test."""

from __future__ import annotations

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
