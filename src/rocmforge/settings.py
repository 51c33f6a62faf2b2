"""Configuration from the environment: the one place that reads ``ROCMFORGE_*`` variables.

Precedence (highest first): explicit arguments / CLI flags, environment variables, a ``.env``
file in the working directory, the defaults below. Everything else in the package receives
values from here explicitly.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ROCMFORGE_", env_file=".env", extra="ignore")

    models: Path = Field(
        default_factory=lambda: Path.home() / ".cache" / "rocmforge" / "models",
        description="Directory holding GGUF files; `rocmforge pull` writes here.",
    )
    gguf: str | None = Field(default=None, description="Model to load when none is named (path or known name).")
    tokenizer: Path | None = Field(default=None, description="HF tokenizer.json overriding the GGUF vocabulary.")
    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N")
    gpu_device: int = Field(default=0, ge=0, description="GPU index used by `auto` and `cuda`.")
    dtype: str = Field(default="auto", description="auto (fp32 on CPU, bf16 on GPU) | float32 | bfloat16 | float16")
    weight_format: str = Field(default="dense", description="dense | quantized (CPU: int4/int8 weights)")
    log_level: str = Field(default="warn", description="Level, optionally per module: warn,rocmforge.engine=debug")
    log_format: str = Field(default="human", description="human | json")


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment, with non-None ``overrides`` (CLI flags) on top."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def default_models_dir() -> Path:
    return load_settings().models
