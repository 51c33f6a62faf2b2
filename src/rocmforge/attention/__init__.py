"""Attention over the paged KV cache: the metadata the runner builds each step, and the
backends that consume it — the plain-torch reference (CPU, and the oracle of every kernel)
and the Triton kernels (GPU), behind the same :class:`AttentionBackend` interface."""

import torch

from rocmforge.attention.backend import AttentionBackend, get_backend
from rocmforge.attention.metadata import AttentionMetadata
from rocmforge.kernels import kernels_usable

__all__ = ["AttentionBackend", "AttentionMetadata", "default_backend", "get_backend"]


def default_backend(device: torch.device) -> str:
    """``triton`` on a GPU with Triton, ``torch`` elsewhere (the CPU runs the reference:
    Triton's CPU interpreter is for tests, not for serving)."""
    return "triton" if device.type == "cuda" and kernels_usable(device) else "torch"
