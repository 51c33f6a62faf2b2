"""Native CPU kernels on GGUF blocks: a PyTorch C++ extension, compiled once and cached.

Owned here: building ``csrc/`` (on first use, or ahead of time by ``python -m
rocmforge.native``, which ``make setup`` runs) into ``~/.cache/rocmforge/native/<key>`` — the
key hashes the sources and their location, the torch build and the Python version, so an
upgrade rebuilds — and loading it as ``torch.ops.rocmforge_cpu``. :func:`ops` returns those
operators, or None with one warning that says why (no compiler, a failed build) and what
runs instead.

The operators (``csrc/ops.cpp``): ``matmul`` (integer dot products on the blocks against
8-bit activation blocks, each weight piece decoded once for a group of activation rows:
decode, batched decode, and the prompts of ``INTEGER_GEMM_TYPES``), ``matmul_dequant``
(dequantized tiles through ATen's GEMM: the other types' prompts), ``dequantize``,
``quantize`` and the instruction-set queries. They use ATen's intra-op thread pool, sized by
``torch.set_num_threads``.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import shutil
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["INTEGER_GEMM_TYPES", "ISA_NAMES", "NATIVE_TYPES", "available", "build", "cache_dir", "ops", "unavailable_reason"]

logger = logging.getLogger(__name__)

SOURCES = Path(__file__).parent / "csrc"
ISA_NAMES = ("scalar", "avx2", "avx2_vnni", "avx512_vnni")
"""Instruction-set tables by index (the ``isa`` argument of the operators; -1: the best)."""

NATIVE_TYPES = frozenset({0, 1, 30, 2, 3, 6, 7, 8, 12, 13, 14})
"""ggml types the matmul reads as stored: F32 F16 BF16 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q4_K Q5_K Q6_K."""

INTEGER_GEMM_TYPES = frozenset({12, 13, 14})
"""Types whose many-row integer ``matmul`` outruns ``matmul_dequant`` (dequantized tiles
through ATen's fp32 GEMM) at every row count: Q4_K Q5_K Q6_K, 1.7-1.9x at 256 rows on the
1B shapes (benchmarks/cpu_matmul.py, 2 Zen 5 cores, AVX-512 VNNI; 1.1-1.4x on the AVX2
tables). Their sub-block sums take 6-bit integer scales inside the integer sum; the
32-element types pay float scales per block and lose to the GEMM on prompts (0.7-1.0x)."""

_failure: str | None = None


def cache_dir() -> Path:
    """Where builds are kept: ``$XDG_CACHE_HOME/rocmforge/native`` (``~/.cache`` by default)."""
    root = os.environ.get("XDG_CACHE_HOME")
    return (Path(root) if root else Path.home() / ".cache") / "rocmforge" / "native"


def _build_key() -> str:
    digest = hashlib.sha256()
    # The sources' location too: torch rebuilds an entry whose build file names other source
    # paths, so two checkouts sharing one cache would rebuild on every alternate load.
    digest.update(str(SOURCES.resolve()).encode())
    for path in sorted(SOURCES.iterdir()):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    digest.update(f"{torch.__version__}|{sys.version}|{sys.platform}".encode())
    return digest.hexdigest()[:16]


def build(*, verbose: bool = False) -> Path:
    """Compile (if not cached) and load the extension; returns the shared library's path.
    Raises RuntimeError naming the missing tool or the compiler's complaint."""
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler ({compiler!r} is not on PATH)")
    # pip's ninja wheel puts the binary beside this interpreter, which need not be on PATH.
    scripts = sysconfig.get_path("scripts")
    if scripts and scripts not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = scripts + os.pathsep + os.environ.get("PATH", "")
    target = cache_dir() / _build_key()
    target.mkdir(parents=True, exist_ok=True)
    library = target / "rocmforge_cpu.so"
    sources = [str(p) for p in sorted(SOURCES.glob("*.cpp"))]
    # One build at a time per cache entry, under a lock the kernel drops when its holder
    # dies. torch's own lock is a plain file that a killed build leaves behind, after which
    # every later load would wait on it forever: holding ours, any such file is stale.
    with open(target / "rocmforge.lock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        (target / "lock").unlink(missing_ok=True)
        _load(cpp_extension, sources, target, library, verbose)
    return library


def _load(cpp_extension: Any, sources: list[str], target: Path, library: Path, verbose: bool) -> None:
    if not library.exists():
        logger.warning("compiling rocmforge's native CPU kernels into %s (once; about a minute)", target)
        start = time.perf_counter()
    else:
        start = None
    try:
        cpp_extension.load(
            name="rocmforge_cpu",
            sources=sources,
            extra_cflags=["-O3", "-fopenmp", "-fno-math-errno", "-Wall"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(target),
            is_python_module=False,
            verbose=verbose,
        )
    except Exception as exc:  # the compiler's output is in the message
        raise RuntimeError(f"building the native CPU kernels failed: {exc}") from exc
    if start is not None:
        logger.warning("native CPU kernels compiled in %.0f s", time.perf_counter() - start)


@functools.cache
def ops() -> Any | None:
    """``torch.ops.rocmforge_cpu``, built and loaded on first call; None (after one warning)
    where it cannot be built."""
    global _failure
    try:
        build()
    except RuntimeError as exc:
        _failure = str(exc).splitlines()[0]
        logger.warning("native CPU kernels unavailable (%s): the CPU runs torch's kernels instead", _failure)
        return None
    return torch.ops.rocmforge_cpu


def available() -> bool:
    """Whether the native operators can be used (builds them on first call)."""
    return ops() is not None


def unavailable_reason() -> str | None:
    """Why :func:`ops` returned None, once it has."""
    return _failure
