"""Configuration from the environment: the one place that reads ``ROCMFORGE_*`` variables.

Precedence (highest first): explicit arguments / CLI flags, environment variables, a ``.env``
file in the working directory, the defaults. Everything else in the package receives values
from here explicitly.

Two kinds of settings. The process-level ones (models directory, addresses, logging, tracing,
fault injection) are declared in :class:`SettingsBase`. Every field of the config classes of
:mod:`rocmforge.config` (load, device, cache, scheduler, server) is a setting too, derived
from the class: same name (``ROCMFORGE_<FIELD>``), type, default, docstring and validation
rule; :meth:`SettingsBase.engine_config` and :meth:`SettingsBase.server_config` hand out the
config objects. :data:`Settings` is the class with both.

``ROCMFORGE_FAULT_INJECT`` is a testing aid, never meant for production: it is parsed once
into a :class:`~rocmforge.testing.fault_spec.FaultInjection` that ``LLM.from_settings`` uses to
wrap the model runner (and to fail GPU initialisation), so the real server can be made to
fail on demand in end-to-end tests.

Unprefixed standard variables read here too: ``NO_COLOR``, and the OpenTelemetry
``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT`` / ``..._PROTOCOL`` that switch request tracing on
(:mod:`rocmforge.server.tracing`). The rest of the ``OTEL_*`` family (headers, timeouts,
sampler, resource attributes) is the OpenTelemetry SDK's own business: it reads them itself.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import (
    AfterValidator,
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from rocmforge.config import ENGINE_PARTS, ConfigField, EngineConfig, ServerConfig, config_fields
from rocmforge.config.fields import Rule
from rocmforge.errors import ConfigError
from rocmforge.logs import FORMATS, parse_level_spec
from rocmforge.testing.fault_spec import FaultInjection

C = TypeVar("C", bound=object)

OTLP_PROTOCOLS = ("http/protobuf", "grpc")
"""The OTLP transports the Python exporters implement (``http/json`` has none)."""


class SettingsBase(BaseSettings):
    """The process-level settings, declared here; :data:`Settings` adds one field per field of
    the config classes (:data:`DERIVED_CONFIGS`), with their types, defaults and docstrings."""

    model_config = SettingsConfigDict(env_prefix="ROCMFORGE_", env_file=".env", extra="ignore")

    models: Path = Field(
        default_factory=lambda: Path.home() / ".cache" / "rocmforge" / "models",
        description="Directory holding GGUF files; `rocmforge pull` writes here.",
    )
    gguf: str | None = Field(default=None, description="Model to load when none is named (path or known name).")
    addr: str = Field(default="127.0.0.1:8080", description="Address `rocmforge serve` binds (HOST:PORT).")
    host: str = Field(default="http://127.0.0.1:8080", description="Server URL the client commands talk to.")
    log_level: str = Field(default="warn", description="Level, optionally per module: warn,rocmforge.engine=debug")
    log_format: str = Field(default="human", description="human | json")
    log_file: Path | None = Field(default=None, description="Also write JSON-lines logs here, rotated by size.")
    log_file_max_bytes: int = Field(default=10 << 20, gt=0, description="Size at which the log file is rotated.")
    log_file_backups: int = Field(default=5, ge=1, description="Rotated log files kept (log.1 ... log.N).")
    fault_inject: str = Field(
        default="",
        description="Testing aid only, never for production: comma-separated faults to inject: gpu_init | "
        "forward_error:<request-id prefix> | forward_fatal:<request-id prefix> | device_lost:<request-id prefix> | "
        "oom_over:<batched tokens> | transient:<count>.",
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

    @model_validator(mode="after")
    def _check_configs(self) -> SettingsBase:
        """Every field passed its own rule: build the config objects, so the rules that span
        fields run too (a :class:`ConfigError` naming the field)."""
        self.engine_config()
        self.server_config()
        return self

    def engine_config(self) -> EngineConfig:
        """The load, device, cache and scheduler configs these settings describe."""
        return EngineConfig(**{part: _build(self, cls) for part, cls in ENGINE_PARTS.items()})

    def server_config(self) -> ServerConfig:
        return _build(self, ServerConfig)


DERIVED_CONFIGS: tuple[type, ...] = (*ENGINE_PARTS.values(), ServerConfig)
"""The config classes whose fields are settings too (``ROCMFORGE_<FIELD>``)."""


def _build(settings: SettingsBase, config_class: type[C]) -> C:
    values = {}
    specs: tuple[ConfigField, ...] = config_fields(config_class)  # type: ignore[arg-type]  # a class is hashable
    for spec in specs:
        value = getattr(settings, spec.name)
        values[spec.name] = value.get_secret_value() if isinstance(value, SecretStr) else value
    return config_class(**values)


def _settings_field(spec: ConfigField) -> tuple[Any, Any]:
    """A config field as a settings field: its type (a ``SecretStr`` for secrets) with the
    config class's rule as the validator, its default and its docstring."""
    annotation: Any = SecretStr | None if spec.secret else spec.annotation
    rule = spec.rule
    if rule is not None:
        annotation = Annotated[annotation, AfterValidator(_as_validator(rule, spec.name, secret=spec.secret))]
    return annotation, Field(default=spec.default, description=spec.doc)


def _as_validator(rule: Rule, name: str, *, secret: bool) -> Callable[[Any], Any]:
    """A rule as a pydantic validator: its ConfigError becomes the ValueError pydantic collects."""

    def validate(value: Any) -> Any:
        plain = value.get_secret_value() if secret and isinstance(value, SecretStr) else value
        try:
            checked = rule(plain, name)
        except ConfigError as exc:
            raise ValueError(exc.message) from None
        return value if secret else checked

    return validate


Settings: type[SettingsBase] = create_model(  # type: ignore[call-overload]
    "Settings",
    __base__=SettingsBase,
    __module__=__name__,
    __doc__="Every setting: the process-level ones of :class:`SettingsBase` and one per config field.",
    **{spec.name: _settings_field(spec) for cls in DERIVED_CONFIGS for spec in config_fields(cls)},
)


def load_settings(**overrides: object) -> SettingsBase:
    """Settings from the environment, with non-None ``overrides`` (CLI flags) on top.

    An invalid value raises :class:`ConfigError` whose one-line message names where it came
    from (the variable, e.g. ``ROCMFORGE_MAX_NUM_SEQS``, or the ``--max-num-seqs`` flag) and
    what is wrong with it."""
    given: dict[str, Any] = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        raise _config_error(exc, given) from None
    except ConfigError as exc:  # a rule spanning fields (each field passed its own)
        where = _source(exc.param, given) if exc.param else "a ROCMFORGE_* setting"
        raise ConfigError(f"invalid setting {where}: {exc.message}", param=exc.param) from None
    except SettingsError as exc:  # a complex value (JSON list) that does not even parse
        field = next((name for name in Settings.model_fields if f'"{name}"' in str(exc)), None)
        where = _source(field, given) if field else "a ROCMFORGE_* setting"
        raise ConfigError(f"invalid setting {where}: the value does not parse ({exc})", param=field) from None


def _config_error(exc: ValidationError, given: dict[str, Any]) -> ConfigError:
    """One line for pydantic's (multi-line) report: each bad setting, its source and why."""
    problems: list[str] = []
    first: str | None = None
    for error in exc.errors(include_url=False):
        field = str(error["loc"][0]) if error["loc"] else ""
        name = _field_name(field)
        first = first or name
        message = str(error["msg"]).removeprefix("Value error, ")
        value = error.get("input")
        # A rule of ours quoted the value already.
        echoed = (isinstance(value, str) and repr(value) in message) or ", got " in message
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
