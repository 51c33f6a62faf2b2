"""Configuration from the environment: the one place that reads ``ROCMFORGE_*`` variables.

Precedence (highest first): explicit arguments / CLI flags, environment variables, a ``.env``
file in the working directory, the defaults below. Everything else in the package receives
values from here explicitly.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
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
    addr: str = Field(default="127.0.0.1:8080", description="Address `rocmforge serve` binds (HOST:PORT).")
    host: str = Field(default="http://127.0.0.1:8080", description="Server URL the client commands talk to.")
    api_key: SecretStr | None = Field(default=None, description="Bearer key required on every route but /health.")
    model_name: str | None = Field(default=None, description="Model id shown to clients (default: file stem).")
    cors_origins: list[str] = Field(default_factory=list, description="Allowed CORS origins (JSON list); empty: off.")
    max_body_bytes: int = Field(default=1 << 20, gt=0, description="Largest accepted request body.")
    max_num_seqs: int = Field(default=64, gt=0, description="Most requests decoded together.")
    max_waiting: int = Field(default=1024, gt=0, description="Waiting-queue capacity; beyond it requests get 429.")
    max_model_len: int | None = Field(default=None, gt=0, description="Context window (default: the model's).")
    kv_cache_memory: int | None = Field(default=None, gt=0, description="KV-cache bytes (default: 512 MiB CPU, 85% GPU).")
    shutdown_timeout: float = Field(default=30.0, ge=0, description="Seconds in-flight requests get on shutdown.")
    log_level: str = Field(default="warn", description="Level, optionally per module: warn,rocmforge.engine=debug")
    log_format: str = Field(default="human", description="human | json")


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment, with non-None ``overrides`` (CLI flags) on top."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def default_models_dir() -> Path:
    return load_settings().models
