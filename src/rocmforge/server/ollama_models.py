"""The served model as Ollama's ``/api/tags``, ``/api/show`` and ``/api/ps`` describe it.

In: the GGUF file the server loaded, its model name and its chat template source. Out: a
:class:`ModelCard` (name with tag, size, digest, ``details``, ``model_info``, ``template``,
``capabilities``), read from the file's metadata once (:func:`model_card`) and kept for the
life of the process: the model is fixed at start-up.

Names: Ollama's always carry a tag; the served model is listed as ``<model_name>:latest``
(as configured when the name already has a tag), and requests may name it either way.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rocmforge.gguf import read_gguf
from rocmforge.gguf.file_types import FILE_TYPES

DEFAULT_TAG = "latest"
TEMPLATE_KEY = "tokenizer.chat_template"
LARGE_ARRAY = 16
"""Metadata arrays longer than this (the vocabulary, the merges) are shown empty unless
``verbose`` (as Ollama does)."""


@dataclass(frozen=True, slots=True)
class ModelCard:
    name: str
    """With its tag: ``<model_name>:latest``."""
    path: str
    size: int
    """The file's size in bytes."""
    digest: str
    """sha256 of the file's path, size and modification time: it names this file, it is
    not a hash of its content (which would take a read of the whole file)."""
    modified_at: str
    details: dict[str, Any]
    model_info: dict[str, Any]
    """The metadata, long arrays shown empty, the chat template left out (it is ``template``)."""
    license: str
    template: str
    capabilities: list[str]

    def accepts(self, name: str) -> bool:
        """Whether a request's ``model`` names this model (with or without the tag)."""
        return name == self.name or f"{name}:{DEFAULT_TAG}" == self.name

    def listing(self) -> dict[str, Any]:
        """The model as ``/api/tags`` lists it."""
        return {"name": self.name, "model": self.name, "modified_at": self.modified_at, "size": self.size,
                "digest": self.digest, "details": self.details}


def tagged(model_name: str) -> str:
    return model_name if ":" in model_name else f"{model_name}:{DEFAULT_TAG}"


@functools.lru_cache(maxsize=4)
def model_card(model_path: str, model_name: str, template: str | None,
               serving: tuple[str, ...] = ()) -> ModelCard:
    """The card of the served model (read once; blocking: call it off the event loop).
    ``serving``: capabilities the server adds to the file's (``thinking``, ``embedding``)."""
    path = Path(model_path)
    stat = path.stat()
    with read_gguf(path) as gguf:
        metadata = dict(gguf.metadata)
        parameters = sum(t.n_elements for t in gguf.tensors.values())
        by_type: dict[str, int] = {}
        for tensor in gguf.tensors.values():
            by_type[tensor.ggml_type.name] = by_type.get(tensor.ggml_type.name, 0) + tensor.n_elements
    architecture = metadata.get("general.architecture")
    family = architecture if isinstance(architecture, str) else "unknown"
    file_type = metadata.get("general.file_type")
    quantization = FILE_TYPES.get(file_type) if isinstance(file_type, int) else None
    if quantization is None and by_type:  # no (known) file type: the type of most weights
        quantization = max(by_type, key=lambda name: by_type[name])
    metadata.setdefault("general.parameter_count", parameters)
    identity = f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()
    license_ = metadata.get("general.license")
    return ModelCard(
        name=tagged(model_name),
        path=str(path),
        size=stat.st_size,
        digest=hashlib.sha256(identity).hexdigest(),
        modified_at=rfc3339(datetime.fromtimestamp(stat.st_mtime, timezone.utc)),
        details={"parent_model": "", "format": "gguf", "family": family, "families": [family],
                 "parameter_size": human_number(parameters), "quantization_level": quantization or "unknown"},
        model_info={k: ([] if isinstance(v, list) and len(v) > LARGE_ARRAY else v)
                    for k, v in metadata.items() if k != TEMPLATE_KEY},
        license=license_ if isinstance(license_, str) else "",
        template=template or "",
        capabilities=["completion", *(["tools"] if template and "tools" in template else []), *serving],
    )


def verbose_model_info(model_path: str) -> dict[str, Any]:
    """All the metadata, long arrays included (blocking: call it off the event loop)."""
    with read_gguf(model_path) as gguf:
        return {k: v for k, v in gguf.metadata.items() if k != TEMPLATE_KEY}


def human_number(count: int) -> str:
    """A parameter count as Ollama writes it: ``8B``, ``8.0B``, ``134.52M``, ``12K``."""
    for size, unit, decimals in ((10**9, "B", 1), (10**6, "M", 2)):
        if count >= size:
            value = count / size
            return f"{value:.0f}{unit}" if value == int(value) else f"{value:.{decimals}f}{unit}"
    return f"{count / 1000:.0f}K" if count >= 1000 else str(count)


def rfc3339(moment: datetime) -> str:
    """``2024-06-04T14:38:31.837530Z``: RFC 3339 with the zone, as Ollama's clients parse it."""
    return moment.astimezone(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")
