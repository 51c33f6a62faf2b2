"""Typed errors for the whole package.

Every error rocmforge raises on purpose is a :class:`RocmForgeError`.  Each carries

* a **category** that decides what the caller does with it
  (``user``: the request or input is wrong, tell the caller and carry on;
  ``recoverable``: retry, preempt or fall back; ``fatal``: stop the engine;
  ``internal``: a bug, fail the one request and log loudly),
* a stable machine-readable **code** (part of the public API: clients match on it),
* an **HTTP status** the server answers with, and
* a user-facing **message**.

Lower-level exceptions (``OSError``, torch out-of-memory, jinja errors, ...) are translated
into these at module boundaries with ``raise ... from exc`` so the cause is kept.

Among the recoverable errors, :func:`is_transient` picks those worth retrying unchanged (a
device hiccup); out-of-memory is recoverable but needs a smaller batch, and overload or
draining need the client to come back later, so neither is transient.

The class tree mirrors the package: GGUF/loader, tokenizer, model, KV cache, scheduler,
device, server.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, ClassVar


class ErrorCategory(str, Enum):
    """What the caller should do with an error."""

    USER = "user"
    RECOVERABLE = "recoverable"
    FATAL = "fatal"
    INTERNAL = "internal"


class RocmForgeError(Exception):
    """Base class of every error rocmforge raises deliberately."""

    category: ClassVar[ErrorCategory] = ErrorCategory.INTERNAL
    code: ClassVar[str] = "internal_error"
    http_status: ClassVar[int] = 500

    def __init__(self, message: str, *, param: str | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.details = details

    def is_recoverable(self) -> bool:
        return self.category is ErrorCategory.RECOVERABLE

    def is_user_error(self) -> bool:
        return self.category is ErrorCategory.USER

    def is_fatal(self) -> bool:
        return self.category is ErrorCategory.FATAL

    def is_transient(self) -> bool:
        """Worth retrying the same work unchanged after a short wait (see :func:`is_transient`)."""
        return self.is_recoverable() and not isinstance(self, _NOT_TRANSIENT)

    def to_dict(self) -> dict[str, Any]:
        """The body of the JSON error shape (without the request id, which the server adds)."""
        return {
            "type": self.category.value,
            "code": self.code,
            "message": self.message,
            "param": self.param,
        }


# --- GGUF files and model loading -------------------------------------------------------


class GGUFError(RocmForgeError):
    """A GGUF file could not be used."""

    category = ErrorCategory.USER
    code = "gguf_error"
    http_status = 400


class GGUFFormatError(GGUFError):
    """The file is malformed: names the field and the byte offset where parsing stopped."""

    code = "gguf_malformed"

    def __init__(self, message: str, *, field: str, offset: int, path: str | None = None) -> None:
        where = f"{path}: " if path else ""
        super().__init__(f"{where}{message} (field {field!r} at byte offset {offset})")
        self.field = field
        self.offset = offset
        self.path = path


class GGUFUnsupportedError(GGUFError):
    """Well-formed, but uses a feature rocmforge does not support (version, tensor type, ...)."""

    code = "gguf_unsupported"


class ModelLoadError(GGUFError):
    """The file parsed, but does not describe a model rocmforge can build."""

    code = "model_load_failed"


class UnsupportedArchitectureError(ModelLoadError):
    code = "unsupported_architecture"


class MissingMetadataError(ModelLoadError):
    code = "missing_metadata"


class ModelNotFoundError(RocmForgeError):
    category = ErrorCategory.USER
    code = "model_not_found"
    http_status = 404


# --- tokenizer ---------------------------------------------------------------------------


class TokenizerError(RocmForgeError):
    category = ErrorCategory.USER
    code = "tokenizer_error"
    http_status = 400


class ChatTemplateError(TokenizerError):
    code = "chat_template_error"


# --- requests ----------------------------------------------------------------------------


class InvalidRequestError(RocmForgeError):
    """A request field is invalid (bad value, prompt too long for the context, ...)."""

    category = ErrorCategory.USER
    code = "invalid_request"
    http_status = 400


class ContextLengthExceededError(InvalidRequestError):
    code = "context_length_exceeded"


class InvalidGrammarError(InvalidRequestError):
    """A structured-output constraint (JSON schema, regex, grammar, choice) that does not
    compile; the message says where."""

    code = "invalid_grammar"


class EmbeddingsUnsupportedError(InvalidRequestError):
    """An embedding request to an engine that has no pooling (a generation model whose file
    declares none, and no ``pooling`` setting)."""

    code = "embeddings_unsupported"


class RequestNotFoundError(RocmForgeError):
    category = ErrorCategory.USER
    code = "request_not_found"
    http_status = 404


class UnsupportedOperationError(RocmForgeError):
    """The server understood the request but does not do that (e.g. pulling or deleting
    models: it serves one model, fixed at start-up)."""

    category = ErrorCategory.USER
    code = "unsupported_operation"
    http_status = 403


class RequestCancelledError(RocmForgeError):
    """A request was cancelled (a cancel call, the shutdown deadline) before it had a result
    that can stand partial (an embedding)."""

    category = ErrorCategory.RECOVERABLE
    code = "request_cancelled"
    http_status = 503


# --- model, device, cache, scheduler ----------------------------------------------------


class ModelExecutionError(RocmForgeError):
    """A forward pass failed for a reason that is not the request's fault."""

    category = ErrorCategory.INTERNAL
    code = "model_execution_failed"
    http_status = 500


class DeviceError(RocmForgeError):
    """The accelerator could not be initialised or used."""

    category = ErrorCategory.RECOVERABLE
    code = "device_error"
    http_status = 503


class DeviceOutOfMemoryError(DeviceError):
    code = "device_out_of_memory"


class KVCacheError(RocmForgeError):
    category = ErrorCategory.INTERNAL
    code = "kv_cache_error"
    http_status = 500


class OutOfKVBlocksError(KVCacheError):
    """Not enough free KV blocks; the scheduler preempts and retries."""

    category = ErrorCategory.RECOVERABLE
    code = "out_of_kv_blocks"
    http_status = 503


class SchedulerError(RocmForgeError):
    category = ErrorCategory.INTERNAL
    code = "scheduler_error"
    http_status = 500


class OverloadedError(SchedulerError):
    """The waiting queue is full: try again later (HTTP 429 with Retry-After)."""

    category = ErrorCategory.RECOVERABLE
    code = "overloaded"
    http_status = 429


class EngineDeadError(RocmForgeError):
    """The engine hit an unrecoverable error and serves nothing more."""

    category = ErrorCategory.FATAL
    code = "engine_dead"
    http_status = 503


# --- configuration and server ------------------------------------------------------------


class ConfigError(RocmForgeError):
    category = ErrorCategory.USER
    code = "invalid_config"
    http_status = 500


class ServerError(RocmForgeError):
    category = ErrorCategory.INTERNAL
    code = "server_error"
    http_status = 500


class ServerDrainingError(ServerError):
    """The server is shutting down (a signal arrived): it admits no new requests; retry
    against another replica."""

    category = ErrorCategory.RECOVERABLE
    code = "server_draining"
    http_status = 503


_NOT_TRANSIENT: tuple[type[RocmForgeError], ...] = (
    DeviceOutOfMemoryError,  # retrying the same batch fails the same way: shrink it instead
    OutOfKVBlocksError,  # the scheduler preempts instead
    OverloadedError,  # the client retries later
    ServerDrainingError,  # the client retries elsewhere
)


def is_transient(exc: BaseException) -> bool:
    """True for a :class:`RocmForgeError` of the ``recoverable`` category that retrying the
    same work unchanged may cure (e.g. a :class:`DeviceError` raised by a step); False for
    out-of-memory, overload, draining and every non-recoverable or foreign exception."""
    return isinstance(exc, RocmForgeError) and exc.is_transient()
