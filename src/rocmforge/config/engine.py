"""The engine's configuration: loading, device, KV cache, scheduler, pooling. One small frozen
dataclass per concern, each field's default and docstring written here and nowhere else.

Flows in from ``LLM(**kwargs)`` (:meth:`EngineConfig.from_kwargs`), from the environment and
the CLI flags (:mod:`rocmforge.settings` and :mod:`rocmforge.cli.config_options` derive their
fields from these classes). Flows out to placement (:mod:`rocmforge.engine.placement`: load,
device, cache), the model runner (cache), the scheduler (scheduler, cache) and the engine
(pooler). Invalid values raise :class:`~rocmforge.errors.ConfigError` naming the field on
construction. Nothing here reads the environment.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from rocmforge.config.fields import (
    Rule,
    apply_rules,
    boolean,
    choice,
    config_fields,
    integer,
    non_empty_string,
    number,
    optional,
    path,
    power_of_two,
)
from rocmforge.errors import ConfigError

MAX_BLOCK_SIZE = 256
DTYPE_NAMES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")
WEIGHT_FORMATS = ("auto", "dense", "quantized")
WeightFormat = Literal["auto", "dense", "quantized"]
POOLING_SETTINGS = ("auto", "mean", "cls", "last")
PoolingSetting = Literal["auto", "mean", "cls", "last"]


def _dtype_name(value: Any, name: str) -> str:
    """A dtype name, or a ``torch.dtype`` given for one (``torch.float32`` -> ``float32``),
    told apart without importing torch."""
    text = str(value)
    if not isinstance(value, str) and text.startswith("torch."):
        text = text.removeprefix("torch.")
    return choice(*DTYPE_NAMES)(text, name)


@dataclass(frozen=True, slots=True)
class LoadConfig:
    """How the model file becomes weights and a tokenizer."""

    tokenizer: Path | None = None
    """HF tokenizer.json overriding the GGUF vocabulary."""
    dtype: str = "auto"
    """Compute dtype: auto (fp32 on the CPU, bf16 on a GPU) | float32 | bfloat16 | float16."""
    weight_format: WeightFormat = "auto"
    """auto (quantized, or dense on a CPU without the native kernels) | dense (every weight dequantized to the compute
    dtype) | quantized (the GGUF blocks as stored, read by Triton kernels on a GPU and native C++
    kernels on the CPU)."""

    RULES: ClassVar[dict[str, Rule]] = {
        "tokenizer": optional(path), "dtype": _dtype_name, "weight_format": choice(*WEIGHT_FORMATS),
    }

    def __post_init__(self) -> None:
        apply_rules(self)


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    """Where the model runs and how much of the device it may use."""

    device: str = "auto"
    """auto (the GPU when one is usable, else the CPU) | cpu | cuda | cuda:N."""
    gpu_index: int = 0
    """GPU used by auto and cuda."""
    gpu_memory_utilization: float = 0.9
    """Share of the GPU's memory the engine plans with (weights, KV cache and workspace)."""
    cuda_graphs: bool = True
    """Replay decode steps from CUDA graphs on a GPU (off: every kernel launches eagerly)."""
    threads: int | None = None
    """CPU threads for the model's kernels (default: the physical cores this process may use)."""

    RULES: ClassVar[dict[str, Rule]] = {
        "device": non_empty_string, "gpu_index": integer(0), "gpu_memory_utilization": number(0.0, 1.0, low_open=True),
        "cuda_graphs": boolean, "threads": optional(integer(1)),
    }

    def __post_init__(self) -> None:
        apply_rules(self)


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """The paged KV cache."""

    block_size: int = 16
    """Tokens per KV block: a power of two in [1, 256]."""
    enable_prefix_caching: bool = True
    """Reuse the K/V of full blocks whose token prefix was already computed."""
    kv_cache_memory: int | None = None
    """Bytes of KV cache (default: 512 MiB on the CPU; on a GPU what the memory plan leaves)."""

    RULES: ClassVar[dict[str, Rule]] = {
        "block_size": power_of_two(1, MAX_BLOCK_SIZE), "enable_prefix_caching": boolean,
        "kv_cache_memory": optional(integer(1)),
    }

    def __post_init__(self) -> None:
        apply_rules(self)


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Limits of continuous batching."""

    max_num_seqs: int = 64
    """Most requests running (holding KV blocks) at once."""
    max_num_batched_tokens: int = 2048
    """Token budget of one step (chunked prefill splits prompts to fit); at least max_num_seqs."""
    max_waiting: int = 1024
    """Waiting-queue capacity; beyond it requests are refused as overloaded (HTTP 429)."""
    max_model_len: int | None = None
    """Context window: prompt plus max_tokens (default: the model's, as far as the KV pool allows)."""

    RULES: ClassVar[dict[str, Rule]] = {
        "max_num_seqs": integer(1), "max_num_batched_tokens": integer(1), "max_waiting": integer(1),
        "max_model_len": optional(integer(2)),
    }

    def __post_init__(self) -> None:
        apply_rules(self)
        self.check_together()

    def check_together(self) -> None:
        """The rule that spans fields (the settings run it once every field passed its own)."""
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ConfigError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                f"({self.max_num_seqs}): every running request decodes in every step; raise it too",
                param="max_num_batched_tokens",
            )


@dataclass(frozen=True, slots=True)
class PoolerConfig:
    """How embedding requests pool the final hidden states (``LLM.embed``, ``/v1/embeddings``)."""

    pooling: PoolingSetting = "auto"
    """Pooling of embeddings: auto (the GGUF's pooling_type; none for a generation model, which then
    cannot embed) | mean | cls | last (override the file's)."""

    RULES: ClassVar[dict[str, Rule]] = {"pooling": choice(*POOLING_SETTINGS)}

    def __post_init__(self) -> None:
        apply_rules(self)


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Everything ``LLM`` needs besides the model file: one object per concern."""

    load: LoadConfig = LoadConfig()
    device: DeviceConfig = DeviceConfig()
    cache: CacheConfig = CacheConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    pooler: PoolerConfig = PoolerConfig()

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        """Split flat keyword arguments (``block_size=8, device="cpu"``) among the parts; an
        unknown name raises :class:`ConfigError` listing the known ones."""
        owner = {f.name: part for part, config_class in ENGINE_PARTS.items() for f in config_fields(config_class)}
        values: dict[str, dict[str, Any]] = {part: {} for part in ENGINE_PARTS}
        for name, value in kwargs.items():
            if name not in owner:
                raise ConfigError(f"unknown engine option {name!r} (known: {', '.join(sorted(owner))})", param=name)
            values[owner[name]][name] = value
        return cls(**{part: ENGINE_PARTS[part](**given) for part, given in values.items()})


ENGINE_PARTS: dict[str, type] = {"load": LoadConfig, "device": DeviceConfig, "cache": CacheConfig,
                                 "scheduler": SchedulerConfig, "pooler": PoolerConfig}
"""The parts of :class:`EngineConfig` by attribute name."""
