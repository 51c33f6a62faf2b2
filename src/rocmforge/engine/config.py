"""Engine configuration: the KV cache and the scheduler, one small validated dataclass each.

Flows in from the CLI / server settings (which read the environment, nothing here does);
flows out to the model runner (``CacheConfig.block_size``; it fills ``num_blocks`` from the
memory budget) and to the :class:`~rocmforge.engine.scheduler.Scheduler` (both). Invalid
values raise :class:`~rocmforge.errors.ConfigError` on construction.
"""

from __future__ import annotations

from dataclasses import dataclass

from rocmforge.errors import ConfigError

MAX_BLOCK_SIZE = 256


@dataclass(slots=True)
class CacheConfig:
    """Shape of the paged KV cache as the scheduler sees it (block counts, not bytes)."""

    block_size: int = 16
    """Tokens per KV block: a power of two in ``[1, 256]``."""
    num_blocks: int | None = None
    """Blocks in the pool. Set by the model runner from the memory budget before the
    scheduler is built; ``None`` until then."""
    enable_prefix_caching: bool = True
    """Reuse the K/V of full blocks whose token prefix was already computed (hash chain)."""

    def __post_init__(self) -> None:
        _check_int(self.block_size, "block_size", low=1, high=MAX_BLOCK_SIZE)
        if self.block_size & (self.block_size - 1):
            raise ConfigError(
                f"block_size must be a power of two, got {self.block_size}", param="block_size"
            )
        if self.num_blocks is not None:
            _check_int(self.num_blocks, "num_blocks", low=1)
        if not isinstance(self.enable_prefix_caching, bool):
            raise ConfigError("enable_prefix_caching must be a bool", param="enable_prefix_caching")


@dataclass(slots=True)
class SchedulerConfig:
    """Limits of continuous batching."""

    max_num_seqs: int = 64
    """Most requests running (holding KV blocks) at once."""
    max_num_batched_tokens: int = 2048
    """Token budget of one step; chunked prefill splits prompts to fit. Must be at least
    ``max_num_seqs`` so every running request can decode in every step."""
    max_waiting: int = 1024
    """Bound of the waiting queue; beyond it ``add_request`` raises ``OverloadedError``."""
    max_model_len: int = 8192
    """Context window: ``len(prompt) + max_tokens`` must not exceed it."""

    def __post_init__(self) -> None:
        _check_int(self.max_num_seqs, "max_num_seqs", low=1)
        _check_int(self.max_num_batched_tokens, "max_num_batched_tokens", low=1)
        _check_int(self.max_waiting, "max_waiting", low=1)
        _check_int(self.max_model_len, "max_model_len", low=2)
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ConfigError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                f"max_num_seqs ({self.max_num_seqs})",
                param="max_num_batched_tokens",
            )


def _check_int(value: object, name: str, *, low: int, high: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{name} must be an integer, got {value!r}", param=name)
    if value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(f"{name} must be {bounds}, got {value}", param=name)
