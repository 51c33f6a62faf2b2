"""Attention over the paged KV cache: the metadata the runner builds each step, and the
backends that consume it (a plain-torch reference today; Triton kernels slot in behind the
same :class:`AttentionBackend` interface)."""

from rocmforge.attention.backend import AttentionBackend, get_backend
from rocmforge.attention.metadata import AttentionMetadata

__all__ = ["AttentionBackend", "AttentionMetadata", "get_backend"]
