"""Triton kernels for the GPU fast path (CUDA and ROCm alike).

Owned here: the kernels and their thin launch wrappers. Each kernel module keeps its plain
torch reference next to it (or names the one it is tested against), and
``tests/kernels`` compares the two on fresh random inputs.

Triton is optional at run time: torch's CUDA and ROCm wheels bring it; a CPU-only install
does without, and the engine then takes its torch paths. Tests run the kernels on CPU
tensors through Triton's interpreter (``TRITON_INTERPRET=1``, set by ``tests/conftest.py``
before anything imports Triton when no GPU is visible).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch


@functools.cache
def triton_available() -> bool:
    """Whether Triton can be imported at all."""
    return importlib.util.find_spec("triton") is not None


@functools.cache
def interpreter_active() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1`` was set
    before Triton was imported): ``triton.jit`` then makes interpreted functions."""
    if not triton_available():
        return False
    import triton
    from triton.runtime.interpreter import InterpretedFunction

    @triton.jit
    def _probe() -> None:
        pass

    return isinstance(_probe, InterpretedFunction)


def kernels_usable(device: torch.device) -> bool:
    """Whether the Triton kernels can run on tensors of ``device``: a GPU with Triton, or
    the CPU under Triton's interpreter."""
    if not triton_available():
        return False
    if device.type == "cuda":
        return not interpreter_active()
    return device.type == "cpu" and interpreter_active()


def is_kernel_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a Triton kernel failing to compile or launch: one of Triton's own
    errors (compilation, out of resources, a backend's assembler), an import error of a
    backend, or a runtime error raised from inside Triton's code (a launch the driver
    refused). Anything else is not a kernel problem and must not be hidden by a fallback."""
    if not triton_available():
        return False
    if isinstance(exc, (ImportError, *_triton_errors())):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and f"{os.sep}triton{os.sep}" in tb.tb_frame.f_code.co_filename


@functools.cache
def _triton_errors() -> tuple[type[BaseException], ...]:
    try:
        from triton.errors import TritonError  # Triton >= 3.3: the base of all of them

        return (TritonError,)
    except ImportError:
        from triton.compiler.errors import CompilationError
        from triton.runtime.errors import OutOfResources

        return (CompilationError, OutOfResources)
