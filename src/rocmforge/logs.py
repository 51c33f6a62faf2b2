"""One logging setup for the whole process, and the request context every record carries.

What flows in: a level spec, a format and an optional file (from :mod:`rocmforge.settings`,
passed in explicitly by the CLI: this module reads no environment variables). What flows
out: handlers on the *root* logger, so every module's ``logging.getLogger(__name__)``, uvicorn's
loggers and Python warnings (``py.warnings``) come out in one format.

Ownership: :func:`setup_logging` owns the handlers it installs (tagged, so a second call
replaces them rather than adding more), the levels of the loggers named in the level spec and
the handlers/propagation of uvicorn's loggers. Handlers installed by anything else (pytest's
``caplog``, an embedding application) are left alone.

Level spec: ``"warn"`` or ``"warn,rocmforge.engine=debug,uvicorn.access=error"``: an
optional bare level for the root logger (default ``warn``) and ``logger=level`` pairs. Levels
are ``debug``, ``info``, ``warn``/``warning``, ``error``, ``critical``, case-insensitive.

Formats (both one line per record; a traceback follows a human line on its own lines):

* ``human``: ``12:34:56.789 INFO    rocmforge.server: listening [request_id=abc]``, the
  level coloured when ``color`` is true (``None``: when the stream is a TTY);
* ``json``: ``{"ts": "2025-01-01T12:34:56.789Z", "level": "INFO", "logger": ..., "message":
  ..., "request_id": ..., "trace_id": ..., "exc_info": ..., <extra fields>}``. The optional
  ``file`` is always JSON lines, rotated by size.

Request context. The HTTP middleware wraps each request in ``with bind_request(request_id):``
and :class:`RequestContextFilter` (on every handler installed here) copies
:data:`request_id_var` / :data:`trace_id_var` onto each record as ``record.request_id`` /
``record.trace_id``. Context variables do not cross into the engine thread, so code there
logs on behalf of a request by naming it explicitly::

    logger.debug("cancelled %s", rid, extra={"request_id": rid})

A ``request_id`` (or ``trace_id``) given through ``extra=`` wins over the context variable.
"""

from __future__ import annotations

import contextvars
import json
import logging
import logging.handlers
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from rocmforge.errors import ConfigError

__all__ = [
    "FORMATS",
    "LevelSpec",
    "RequestContextFilter",
    "bind_request",
    "parse_level_spec",
    "request_id_var",
    "setup_logging",
    "trace_id_var",
]

FORMATS = frozenset({"human", "json"})
DEFAULT_MAX_FILE_BYTES = 10 << 20
DEFAULT_BACKUP_COUNT = 5
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("rocmforge_request_id", default=None)
trace_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("rocmforge_trace_id", default=None)

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
_CONTEXT_FIELDS = ("request_id", "trace_id")
# Attributes every LogRecord has (plus the ones formatters add): anything else came in via extra=.
_RECORD_FIELDS = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}
# uvicorn passes a pre-coloured copy of its message as an extra; it is noise in our output.
_IGNORED_EXTRAS = frozenset({"color_message"})
_HANDLER_TAG = "_rocmforge_handler"

_lock = threading.Lock()
_configured_loggers: set[str] = set()  # loggers whose level an earlier setup_logging call set


# --- level spec -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LevelSpec:
    """A parsed level spec: the root level and per-logger overrides."""

    root: int = logging.WARNING
    loggers: dict[str, int] = field(default_factory=dict)


def parse_level_spec(spec: str) -> LevelSpec:
    """Parse ``"warn,rocmforge.engine=debug"``; raise :class:`ConfigError` naming the bad part."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError("log level spec is empty (expected e.g. 'warn' or 'warn,rocmforge.engine=debug')",
                          param="log_level")
    root: int | None = None
    loggers: dict[str, int] = {}
    for raw in spec.split(","):
        part = raw.strip()
        if not part:
            raise ConfigError(f"empty entry in log level spec {spec!r}", param="log_level")
        name, sep, level_text = part.partition("=")
        name = name.strip()
        if not sep:
            if root is not None:
                raise ConfigError(f"log level spec {spec!r} gives more than one default level ({part!r})",
                                  param="log_level")
            root = _level(part, spec)
            continue
        if not name or any(ch.isspace() for ch in name):
            raise ConfigError(f"bad logger name in {part!r} of log level spec {spec!r}", param="log_level")
        if name in loggers:
            raise ConfigError(f"logger {name!r} appears twice in log level spec {spec!r}", param="log_level")
        loggers[name] = _level(level_text.strip(), spec)
    return LevelSpec(root=logging.WARNING if root is None else root, loggers=loggers)


def _level(text: str, spec: str) -> int:
    level = _LEVELS.get(text.lower())
    if level is None:
        choices = ", ".join(sorted(_LEVELS))
        raise ConfigError(f"unknown log level {text!r} in log level spec {spec!r} (choose from {choices})",
                          param="log_level")
    return level


# --- request context --------------------------------------------------------------------


@contextmanager
def bind_request(request_id: str | None, trace_id: str | None = None) -> Iterator[None]:
    """Tag every record logged in this context (this task / thread) with the request's ids."""
    request_token = request_id_var.set(request_id)
    trace_token = trace_id_var.set(trace_id)
    try:
        yield
    finally:
        trace_id_var.reset(trace_token)
        request_id_var.reset(request_token)


class RequestContextFilter(logging.Filter):
    """Copies the bound request/trace ids onto each record unless ``extra=`` already set them."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id_var.get()
        if getattr(record, "trace_id", None) is None:
            record.trace_id = trace_id_var.get()
        return True


# --- formatters -------------------------------------------------------------------------


def _safe_repr(value: object) -> str:
    try:
        return repr(value)
    except Exception:  # a broken __repr__ must not take the log line with it
        return f"<unrepresentable {type(value).__name__}>"


def _safe_str(value: object) -> str:
    try:
        return str(value)
    except Exception:
        return _safe_repr(value)


def _safe_message(record: logging.LogRecord) -> str:
    """``record.getMessage()``, falling back to the raw message and args when formatting fails."""
    try:
        return record.getMessage()
    except Exception:
        return f"{_safe_str(record.msg)} (unformattable args: {_safe_repr(record.args)})"


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {
        key: value
        for key, value in record.__dict__.items()
        if key not in _RECORD_FIELDS and key not in _CONTEXT_FIELDS and key not in _IGNORED_EXTRAS
        and not key.startswith("_")
    }


def _json_safe(value: object) -> Any:
    """``value`` if it serialises to strict JSON, else its ``repr``."""
    try:
        json.dumps(value, allow_nan=False)
    except Exception:
        return _safe_repr(value)
    return value


class _BaseFormatter(logging.Formatter):
    def _exception_text(self, record: logging.LogRecord) -> str | None:
        if record.exc_info:
            try:
                return self.formatException(record.exc_info)
            except Exception:
                return f"<unformattable exception {_safe_repr(record.exc_info[1])}>"
        if record.exc_text:
            return str(record.exc_text)
        return None


class JsonFormatter(_BaseFormatter):
    """One JSON object per record; never raises."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds")
        payload: dict[str, Any] = {
            "ts": ts.replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": _safe_message(record),
        }
        for key in _CONTEXT_FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                payload[key] = _json_safe(value)
        exception = self._exception_text(record)
        if exception is not None:
            payload["exc_info"] = exception
        if record.stack_info:
            payload["stack_info"] = str(record.stack_info)
        for key, value in _extras(record).items():
            payload[key if key not in payload else f"extra_{key}"] = _json_safe(value)
        return json.dumps(payload, ensure_ascii=False)


_COLORS = {
    logging.DEBUG: "\x1b[2m",  # dim
    logging.INFO: "\x1b[32m",  # green
    logging.WARNING: "\x1b[33m",  # yellow
    logging.ERROR: "\x1b[31m",  # red
    logging.CRITICAL: "\x1b[1;31m",  # bold red
}
_RESET = "\x1b[0m"


class HumanFormatter(_BaseFormatter):
    """``HH:MM:SS.mmm LEVEL logger: message [request_id=... key=value]``, optionally coloured."""

    def __init__(self, color: bool = False) -> None:
        super().__init__()
        self.color = color

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        level = f"{record.levelname:<7}"
        if self.color:
            nearest = max((k for k in _COLORS if k <= record.levelno), default=logging.DEBUG)
            level = f"{_COLORS[nearest]}{level}{_RESET}"
        line = f"{stamp}.{int(record.msecs):03d} {level} {record.name}: {_safe_message(record)}"
        fields = [(key, getattr(record, key, None)) for key in _CONTEXT_FIELDS] + list(_extras(record).items())
        context = [f"{key}={_safe_str(value)}" for key, value in fields if value is not None]
        if context:
            line += " [" + " ".join(context) + "]"
        exception = self._exception_text(record)
        if exception is not None:
            line += "\n" + exception
        if record.stack_info:
            line += "\n" + str(record.stack_info)
        return line


# --- setup ------------------------------------------------------------------------------


def _isatty(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except Exception:  # closed or exotic streams
        return False


def _tag(handler: logging.Handler) -> logging.Handler:
    setattr(handler, _HANDLER_TAG, True)
    handler.addFilter(RequestContextFilter())
    return handler


def setup_logging(
    level: str = "warn",
    fmt: str = "human",
    file: str | Path | None = None,
    *,
    stream: IO[str] | None = None,
    color: bool | None = None,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    backup_count: int = DEFAULT_BACKUP_COUNT,
) -> None:
    """Configure the process's logging; calling it again replaces what the last call installed.

    ``level``: a level spec (see the module docstring). ``fmt``: ``human`` or ``json`` for
    ``stream`` (default ``sys.stderr``). ``file``: also write JSON lines there, rotating at
    ``max_file_bytes`` and keeping ``backup_count`` old files. ``color``: colour the human
    format's level (``None``: when ``stream`` is a TTY; pass ``False`` for ``NO_COLOR``).
    Raises :class:`ConfigError` for a bad spec, format, size or an unopenable file.
    """
    spec = parse_level_spec(level)
    fmt_name = fmt.lower() if isinstance(fmt, str) else fmt
    if fmt_name not in FORMATS:
        raise ConfigError(f"log format must be one of {sorted(FORMATS)}, got {fmt!r}", param="log_format")
    if max_file_bytes <= 0:
        raise ConfigError(f"log file size limit must be positive, got {max_file_bytes}", param="log_file_max_bytes")
    if backup_count < 1:
        raise ConfigError(f"log file backups must be at least 1, got {backup_count}", param="log_file_backups")

    out = sys.stderr if stream is None else stream
    console = logging.StreamHandler(out)
    use_color = _isatty(out) if color is None else color
    console.setFormatter(JsonFormatter() if fmt_name == "json" else HumanFormatter(color=use_color))
    handlers: list[logging.Handler] = [_tag(console)]
    if file is not None:
        path = Path(file)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            file_handler = logging.handlers.RotatingFileHandler(
                path, maxBytes=max_file_bytes, backupCount=backup_count, encoding="utf-8"
            )
        except OSError as exc:
            raise ConfigError(f"cannot open log file {str(path)!r}: {exc.strerror or exc}", param="log_file") from exc
        file_handler.setFormatter(JsonFormatter())
        handlers.append(_tag(file_handler))

    with _lock:
        root = logging.getLogger()
        for old in [h for h in root.handlers if getattr(h, _HANDLER_TAG, False)]:
            root.removeHandler(old)
            old.close()
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(spec.root)

        for name in _configured_loggers - spec.loggers.keys():
            logging.getLogger(name).setLevel(logging.NOTSET)
        for name in UVICORN_LOGGERS:
            uvicorn_logger = logging.getLogger(name)
            for old in list(uvicorn_logger.handlers):
                uvicorn_logger.removeHandler(old)
            uvicorn_logger.propagate = True
            uvicorn_logger.setLevel(logging.NOTSET)
        for name, logger_level in spec.loggers.items():
            logging.getLogger(name).setLevel(logger_level)
        _configured_loggers.clear()
        _configured_loggers.update(spec.loggers)

        logging.captureWarnings(True)
