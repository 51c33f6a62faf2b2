"""Model hyper-parameters, read and validated from GGUF metadata.

In: the metadata mapping of a GGUF file (``rocmforge.gguf.GGUFFile.metadata``).
Out: a frozen :class:`ModelConfig` that the model, the loader and the runner share.
Missing or inconsistent values raise :class:`~rocmforge.errors.MissingMetadataError` or
:class:`~rocmforge.errors.ModelLoadError` naming the key.
"""

from __future__ import annotations

import math
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rocmforge.errors import MissingMetadataError, ModelLoadError
from rocmforge.models.registry import ArchSpec, get_arch
from rocmforge.pooling_params import GGUF_POOLING_TYPES

MIN_CONTEXT = 2
"""The shortest context the engine can run (a prompt token and one generated token)."""


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """Position scaling of RoPE. ``linear`` divides positions by ``factor``; llama-3 style
    scaling arrives as a per-frequency ``rope_freqs`` tensor instead (see the loader)."""

    kind: str
    factor: float


@dataclass(frozen=True, slots=True)
class ModelConfig:
    arch: ArchSpec
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_context: int
    rope_scaling: RopeScaling | None = None
    pooling_type: str | None = None
    """``{arch}.pooling_type`` by llama.cpp's name (``none`` | ``mean`` | ``cls`` | ``last`` |
    ``rank``); None when the file has no such key (a generation model)."""

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any], vocab_size: int) -> ModelConfig:
        """Build the config. ``vocab_size`` comes from the embedding tensor's shape, which
        is what the weights actually hold (the ``vocab_size`` key is optional in GGUF)."""
        arch_name = metadata.get("general.architecture")
        if not isinstance(arch_name, str):
            raise MissingMetadataError("GGUF metadata has no 'general.architecture' string")
        arch = get_arch(arch_name)
        keys = _Keys(metadata, arch_name)

        hidden = keys.get_int("embedding_length")
        num_heads = keys.get_int("attention.head_count")
        num_kv_heads = keys.get_int("attention.head_count_kv", default=num_heads)
        if hidden % num_heads and keys.get("attention.key_length") is None:
            raise ModelLoadError(
                f"metadata {keys.name('embedding_length')} = {hidden} is not a multiple of "
                f"{keys.name('attention.head_count')} = {num_heads} (and no {keys.name('attention.key_length')})"
            )
        head_dim = keys.get_int("attention.key_length", default=hidden // num_heads)
        head_dim_source = (
            keys.name("attention.key_length") if keys.get("attention.key_length") is not None
            else f"{keys.name('embedding_length')} / {keys.name('attention.head_count')}"
        )
        if keys.get_int("attention.value_length", default=head_dim) != head_dim:
            raise ModelLoadError(
                f"metadata {keys.name('attention.value_length')} differs from the head dimension {head_dim} = "
                f"{head_dim_source}: not supported"
            )
        if num_heads % num_kv_heads:
            raise ModelLoadError(
                f"metadata {keys.name('attention.head_count')} = {num_heads} is not a multiple of "
                f"{keys.name('attention.head_count_kv')} = {num_kv_heads}"
            )
        if keys.get_int("rope.dimension_count", default=head_dim) != head_dim:
            raise ModelLoadError(
                f"partial rotary embeddings (metadata {keys.name('rope.dimension_count')} other than the head "
                f"dimension {head_dim} = {head_dim_source}) are not supported"
            )
        if head_dim % 2:
            raise ModelLoadError(f"head dimension {head_dim} = {head_dim_source} must be even for RoPE")
        declared_vocab = keys.get("vocab_size")
        if declared_vocab is not None and declared_vocab != vocab_size:
            raise ModelLoadError(
                f"metadata {keys.name('vocab_size')} is {reprlib.repr(declared_vocab)} "
                f"but token_embd has {vocab_size} rows"
            )

        return cls(
            arch=arch,
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=keys.get_int("feed_forward_length"),
            num_layers=keys.get_int("block_count"),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=keys.get_float("attention.layer_norm_rms_epsilon", default=1e-5),
            rope_theta=keys.get_float("rope.freq_base", default=arch.default_rope_theta),
            max_context=keys.get_int("context_length", minimum=MIN_CONTEXT),
            rope_scaling=_rope_scaling(keys),
            pooling_type=_pooling_type(keys),
        )


def _pooling_type(keys: _Keys) -> str | None:
    value = keys.get("pooling_type")
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value not in GGUF_POOLING_TYPES:
        known = ", ".join(f"{k} ({name})" for k, name in GGUF_POOLING_TYPES.items())
        raise ModelLoadError(f"metadata {keys.name('pooling_type')} must be one of {known}, got {reprlib.repr(value)}")
    return GGUF_POOLING_TYPES[value]


def _rope_scaling(keys: _Keys) -> RopeScaling | None:
    kind = keys.get("rope.scaling.type")
    if kind in (None, "none"):
        return None
    if kind != "linear":
        raise ModelLoadError(f"RoPE scaling type {reprlib.repr(kind)} is not supported (supported: none, linear)")
    factor = keys.get_float("rope.scaling.factor", default=1.0)
    return None if factor == 1.0 else RopeScaling(kind="linear", factor=factor)


class _Keys:
    """Typed access to ``{arch}.*`` keys with errors that name the key."""

    def __init__(self, metadata: Mapping[str, Any], arch: str) -> None:
        self._metadata = metadata
        self._arch = arch

    def name(self, suffix: str) -> str:
        """The full key, quoted, for messages."""
        return f"'{self._arch}.{suffix}'"

    def get(self, suffix: str) -> Any:
        return self._metadata.get(f"{self._arch}.{suffix}")

    def get_int(self, suffix: str, default: int | None = None, minimum: int = 1) -> int:
        value = self._require(suffix, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            what = "a positive integer" if minimum == 1 else f"an integer of at least {minimum}"
            raise ModelLoadError(f"metadata '{self._arch}.{suffix}' must be {what}, got {reprlib.repr(value)}")
        return value

    def get_float(self, suffix: str, default: float | None = None) -> float:
        """A positive, finite number (NaN and infinity are refused too)."""
        value = self._require(suffix, default)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < math.inf:
            raise ModelLoadError(
                f"metadata '{self._arch}.{suffix}' must be a positive number, got {reprlib.repr(value)}"
            )
        return float(value)

    def _require(self, suffix: str, default: Any) -> Any:
        value = self.get(suffix)
        if value is None:
            if default is None:
                raise MissingMetadataError(
                    f"GGUF metadata lacks '{self._arch}.{suffix}', required for architecture {self._arch!r}"
                )
            return default
        return value

