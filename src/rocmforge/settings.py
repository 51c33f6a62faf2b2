"""Configuration from the environment: the one place that reads ``ROCMFORGE_*`` variables.

Precedence (highest first): explicit arguments / CLI flags, environment variables, a ``.env``
file in the working directory, the defaults below. Everything else in the package receives
values from here explicitly.

``ROCMFORGE_FAULT_INJECT`` is a testing aid, never meant for production: it is parsed once
into a :class:`FaultInjection` that ``LLM.from_settings`` passes down to device selection and
the model runner, so the real server can be made to fail on demand in end-to-end tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from rocmforge.errors import ConfigError
from rocmforge.logs import FORMATS, parse_level_spec

FAULT_KINDS = ("gpu_init", "forward_error", "forward_fatal")


@dataclass(frozen=True, slots=True)
class FaultInjection:
    """Faults to inject, for tests only (``ROCMFORGE_FAULT_INJECT``). Empty: inject nothing.

    Spec: comma-separated entries, each one of

    * ``gpu_init``: initialising the GPU fails (device selection behaves as if torch.cuda
      raised), so ``device=auto`` falls back to the CPU and ``device=cuda`` fails;
    * ``forward_error:<prefix>``: a forward pass whose batch holds a request whose id starts
      with ``<prefix>`` raises :class:`~rocmforge.errors.ModelExecutionError` (clients pick
      ids with ``X-Request-Id``);
    * ``forward_fatal:<prefix>``: likewise, but raises the fatal
      :class:`~rocmforge.errors.EngineDeadError`, which kills the engine.
    """

    gpu_init: bool = False
    forward_error: tuple[str, ...] = ()
    """Request-id prefixes whose forward pass raises ``ModelExecutionError``."""
    forward_fatal: tuple[str, ...] = ()
    """Request-id prefixes whose forward pass raises ``EngineDeadError``."""

    @classmethod
    def parse(cls, spec: str | None) -> FaultInjection:
        """Parse ``"gpu_init,forward_error:boom"``; raise :class:`ConfigError` naming the bad part."""
        gpu_init = False
        prefixes: dict[str, list[str]] = {"forward_error": [], "forward_fatal": []}
        for raw in (spec or "").split(","):
            part = raw.strip()
            if not part:
                continue
            kind, sep, arg = part.partition(":")
            kind = kind.strip()
            if kind == "gpu_init" and not sep:
                gpu_init = True
            elif kind in prefixes and sep and arg.strip():
                prefixes[kind].append(arg.strip())
            else:
                raise ConfigError(
                    f"bad fault spec {part!r} in {spec!r} (use gpu_init, forward_error:<request-id prefix> "
                    "or forward_fatal:<request-id prefix>)",
                    param="fault_inject",
                )
        return cls(gpu_init, tuple(prefixes["forward_error"]), tuple(prefixes["forward_fatal"]))

    @property
    def active(self) -> bool:
        return self.gpu_init or bool(self.forward_error) or bool(self.forward_fatal)


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
    shutdown_timeout: float = Field(
        default=30.0,
        ge=0,
        description="Seconds in-flight requests get to finish after SIGTERM/SIGINT before they are cancelled.",
    )
    log_level: str = Field(default="warn", description="Level, optionally per module: warn,rocmforge.engine=debug")
    log_format: str = Field(default="human", description="human | json")
    log_file: Path | None = Field(default=None, description="Also write JSON-lines logs here, rotated by size.")
    log_file_max_bytes: int = Field(default=10 << 20, gt=0, description="Size at which the log file is rotated.")
    log_file_backups: int = Field(default=5, ge=1, description="Rotated log files kept (log.1 ... log.N).")
    fault_inject: str = Field(
        default="",
        description="Testing aid only, never for production: comma-separated faults to inject: gpu_init | "
        "forward_error:<request-id prefix> | forward_fatal:<request-id prefix>.",
    )
    no_color: bool = Field(
        default=False,
        validation_alias=AliasChoices("no_color", "NO_COLOR"),
        description="Plain (uncoloured) human logs; set by the standard NO_COLOR variable (any non-empty value).",
    )

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        try:
            parse_level_spec(value)
        except ConfigError as exc:
            raise ValueError(exc.message) from None
        return value

    @field_validator("log_format")
    @classmethod
    def _check_log_format(cls, value: str) -> str:
        normalized = value.strip().lower()
        if normalized not in FORMATS:
            raise ValueError(f"log_format must be 'human' or 'json', got {value!r}")
        return normalized

    @field_validator("fault_inject")
    @classmethod
    def _check_fault_inject(cls, value: str) -> str:
        try:
            FaultInjection.parse(value)
        except ConfigError as exc:
            raise ValueError(exc.message) from None
        return value

    def faults(self) -> FaultInjection:
        """``fault_inject`` parsed (validated on construction, so this does not raise)."""
        return FaultInjection.parse(self.fault_inject)

    @field_validator("no_color", mode="before")
    @classmethod
    def _no_color_flag(cls, value: object) -> object:
        # https://no-color.org: any non-empty value disables colour; booleans pass through.
        return bool(value) if isinstance(value, str) else value


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment, with non-None ``overrides`` (CLI flags) on top."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def default_models_dir() -> Path:
    return load_settings().models
