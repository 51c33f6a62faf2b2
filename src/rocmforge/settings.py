"""Configuration from the environment: the one place that reads ``ROCMFORGE_*`` variables.

Precedence (highest first): explicit arguments / CLI flags, environment variables, a ``.env``
file in the working directory, the defaults below. Everything else in the package receives
values from here explicitly.

``ROCMFORGE_FAULT_INJECT`` is a testing aid, never meant for production: it is parsed once
into a :class:`FaultInjection` that ``LLM.from_settings`` passes down to device selection and
the model runner, so the real server can be made to fail on demand in end-to-end tests.

Unprefixed standard variables read here too: ``NO_COLOR``, and the OpenTelemetry
``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT`` / ``..._PROTOCOL`` that switch request tracing on
(:mod:`rocmforge.server.tracing`). The rest of the ``OTEL_*`` family (headers, timeouts,
sampler, resource attributes) is the OpenTelemetry SDK's own business: it reads them itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from rocmforge.errors import ConfigError
from rocmforge.logs import FORMATS, parse_level_spec

FAULT_KINDS = ("gpu_init", "forward_error", "forward_fatal", "oom_over", "transient")
OTLP_PROTOCOLS = ("http/protobuf", "grpc")
"""The OTLP transports the Python exporters implement (``http/json`` has none)."""


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
      :class:`~rocmforge.errors.EngineDeadError`, which kills the engine;
    * ``oom_over:<tokens>``: a forward pass over more than ``<tokens>`` batched tokens runs
      out of device memory (torch's own out-of-memory error for the device, which the model
      runner translates into :class:`~rocmforge.errors.DeviceOutOfMemoryError`). The limit
      is on tokens, not sequences: a decode-only batch of ``n`` requests is ``n`` tokens, so
      it bounds the batch size too, and a long prompt alone is cured by a smaller chunk;
    * ``transient:<n>``: the first ``n`` forward passes of the process (batched, retried or
      re-run alone, each counts) raise the recoverable
      :class:`~rocmforge.errors.DeviceError`, which the engine retries with backoff.
    """

    gpu_init: bool = False
    forward_error: tuple[str, ...] = ()
    """Request-id prefixes whose forward pass raises ``ModelExecutionError``."""
    forward_fatal: tuple[str, ...] = ()
    """Request-id prefixes whose forward pass raises ``EngineDeadError``."""
    oom_over: int | None = None
    """Forward passes over more batched tokens than this run out of memory; None: never."""
    transient: int = 0
    """How many forward passes (the first ones) raise a transient ``DeviceError``."""

    @classmethod
    def parse(cls, spec: str | None) -> FaultInjection:
        """Parse ``"gpu_init,forward_error:boom,oom_over:64"``; raise :class:`ConfigError`
        naming the bad part."""
        gpu_init = False
        prefixes: dict[str, list[str]] = {"forward_error": [], "forward_fatal": []}
        counts: dict[str, int] = {}
        for raw in (spec or "").split(","):
            part = raw.strip()
            if not part:
                continue
            kind, sep, arg = part.partition(":")
            kind, arg = kind.strip(), arg.strip()
            if kind == "gpu_init" and not sep:
                gpu_init = True
            elif kind in prefixes and sep and arg:
                prefixes[kind].append(arg)
            elif kind in ("oom_over", "transient") and kind not in counts and _positive_int(arg):
                counts[kind] = int(arg)
            else:
                raise ConfigError(
                    f"bad fault spec {part!r} in {spec!r} (use gpu_init, forward_error:<request-id prefix>, "
                    "forward_fatal:<request-id prefix>, oom_over:<tokens> or transient:<count>; the numbers are "
                    "positive integers, given once each)",
                    param="fault_inject",
                )
        return cls(gpu_init, tuple(prefixes["forward_error"]), tuple(prefixes["forward_fatal"]),
                   counts.get("oom_over"), counts.get("transient", 0))

    @property
    def active(self) -> bool:
        return self.gpu_init or self.affects_forward

    @property
    def affects_forward(self) -> bool:
        """Some fault hits the model runner's forward pass."""
        return bool(self.forward_error or self.forward_fatal or self.oom_over is not None or self.transient)


def _positive_int(text: str) -> bool:
    return text.isascii() and text.isdigit() and int(text) > 0


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
    weight_format: Literal["auto", "dense", "quantized"] = Field(
        default="auto",
        description="auto (quantized on GPU, dense on CPU) | dense | quantized (GPU: GGUF blocks; CPU: int4/int8)",
    )
    addr: str = Field(default="127.0.0.1:8080", description="Address `rocmforge serve` binds (HOST:PORT).")
    host: str = Field(default="http://127.0.0.1:8080", description="Server URL the client commands talk to.")
    api_key: SecretStr | None = Field(default=None, description="Bearer key required on every route but /health.")
    model_name: str | None = Field(default=None, description="Model id shown to clients (default: file stem).")
    cors_origins: list[str] = Field(default_factory=list, description="Allowed CORS origins (JSON list); empty: off.")
    max_body_bytes: int = Field(default=1 << 20, gt=0, description="Largest accepted request body.")
    max_num_seqs: int = Field(default=64, gt=0, description="Most requests decoded together.")
    max_waiting: int = Field(default=1024, gt=0, description="Waiting-queue capacity; beyond it requests get 429.")
    max_model_len: int | None = Field(default=None, gt=0, description="Context window (default: the model's).")
    kv_cache_memory: int | None = Field(
        default=None, gt=0, description="KV-cache bytes (default: 512 MiB CPU; GPU: what the memory plan leaves)."
    )
    cuda_graphs: bool = Field(default=True, description="Replay decode steps from CUDA graphs on a GPU.")
    gpu_memory_utilization: float = Field(
        default=0.9, gt=0, le=1, description="Share of the GPU's memory the engine plans with (weights + KV + workspace)."
    )
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
        "forward_error:<request-id prefix> | forward_fatal:<request-id prefix> | oom_over:<batched tokens> | "
        "transient:<count>.",
    )
    no_color: bool = Field(
        default=False,
        validation_alias=AliasChoices("no_color", "NO_COLOR"),
        description="Plain (uncoloured) human logs; set by the standard NO_COLOR variable (any non-empty value).",
    )
    otel_exporter_otlp_endpoint: str | None = Field(
        default=None,
        validation_alias=AliasChoices(
            "otel_exporter_otlp_endpoint", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
        ),
        description="OTLP collector URL; when set (standard OpenTelemetry variables), request traces are exported "
        "there (needs the `otlp` extra). Only the switch: the OpenTelemetry SDK reads this and the other "
        "OTEL_EXPORTER_OTLP_* variables (headers, timeout, TLS) itself.",
    )
    otel_exporter_otlp_protocol: str = Field(
        default="http/protobuf",
        validation_alias=AliasChoices(
            "otel_exporter_otlp_protocol", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"
        ),
        description="OTLP transport: http/protobuf | grpc (standard OpenTelemetry variables).",
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

    @field_validator("otel_exporter_otlp_endpoint")
    @classmethod
    def _blank_endpoint_is_unset(cls, value: str | None) -> str | None:
        return (value.strip() or None) if value is not None else None

    @field_validator("otel_exporter_otlp_protocol")
    @classmethod
    def _check_otlp_protocol(cls, value: str) -> str:
        normalized = value.strip().lower()
        if normalized not in OTLP_PROTOCOLS:
            raise ValueError(f"OTLP protocol must be one of {', '.join(OTLP_PROTOCOLS)}, got {value!r}")
        return normalized

    @field_validator("no_color", mode="before")
    @classmethod
    def _no_color_flag(cls, value: object) -> object:
        # https://no-color.org: any non-empty value disables colour; booleans pass through.
        return bool(value) if isinstance(value, str) else value


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment, with non-None ``overrides`` (CLI flags) on top.

    An invalid value raises :class:`ConfigError` whose one-line message names where it came
    from (the variable, e.g. ``ROCMFORGE_MAX_NUM_SEQS``, or the ``--max-num-seqs`` flag) and
    what is wrong with it."""
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        raise _config_error(exc, given) from None
    except SettingsError as exc:  # a complex value (JSON list) that does not even parse
        field = next((name for name in Settings.model_fields if f'"{name}"' in str(exc)), None)
        where = _source(field, given) if field else "a ROCMFORGE_* setting"
        raise ConfigError(f"invalid setting {where}: the value does not parse ({exc})", param=field) from None


def _config_error(exc: ValidationError, given: dict[str, object]) -> ConfigError:
    """One line for pydantic's (multi-line) report: each bad setting, its source and why."""
    problems: list[str] = []
    first: str | None = None
    for error in exc.errors(include_url=False):
        field = str(error["loc"][0]) if error["loc"] else ""
        name = _field_name(field)
        first = first or name
        message = str(error["msg"]).removeprefix("Value error, ")
        value = error.get("input")
        echoed = isinstance(value, str) and repr(value) in message  # a validator of ours quoted it
        shown = "" if echoed or isinstance(value, dict) or value is None else f" (got {_short(value)})"
        problems.append(f"{_source(name, given)}: {message}{shown}")
    return ConfigError("invalid setting " + "; ".join(problems), param=first)


def _field_name(loc: str) -> str:
    """The field an error location names (an alias such as ``NO_COLOR`` for some fields)."""
    if loc in Settings.model_fields:
        return loc
    for name, info in Settings.model_fields.items():
        alias = info.validation_alias
        if isinstance(alias, AliasChoices) and loc in alias.choices:
            return name
    return loc


def _source(field: str, given: dict[str, object]) -> str:
    """Where a field's value came from: the CLI flag, or the environment variable (also
    what a ``.env`` line is called)."""
    if field in given:
        return "--" + field.replace("_", "-")
    info = Settings.model_fields.get(field)
    alias = info.validation_alias if info is not None else None
    if isinstance(alias, AliasChoices):
        names = [str(choice) for choice in alias.choices if str(choice).isupper()]
        for name in names:
            if name in os.environ:
                return name
        if names:
            return names[0]
    return f"ROCMFORGE_{field.upper()}"


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def default_models_dir() -> Path:
    return load_settings().models
