"""Every Triton kernel compiles for an H100 (sm_90) and an MI300X (gfx942), without
register spills and within the shared memory (LDS) a program may use.

The other kernel tests run through Triton's interpreter, which never invokes the real
compiler: a kernel can pass there and fail to compile, spill or overflow shared memory
on a GPU. This file compiles ahead of time instead, with no GPU needed (Triton bundles
``ptxas`` and the AMD LLVM backend). The work happens in ``compile_kernels.py`` next to
this file, run as subprocesses (one per core, the jobs split between them) with
``TRITON_INTERPRET`` unset and a fresh Triton cache, so every kernel really compiles. Its
table ``CASES`` names model shapes, dtypes and call sizes; the launch wrappers themselves
choose the constexprs (tiles, warps, stages) for those calls, so a change of a wrapper's
default config is compiled here without editing the table.

Per compiled kernel the records hold registers per thread, spills (local memory words
per thread, as Triton's launcher reports ``n_spills``) and shared memory bytes; a failing
case prints its rows, and the whole table is printed with the module's setup output.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("triton")

_SCRIPT = Path(__file__).with_name("compile_kernels.py")
_spec = importlib.util.spec_from_file_location("compile_kernels", _SCRIPT)
compile_kernels = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = compile_kernels  # its dataclasses look their module up there
_spec.loader.exec_module(compile_kernels)

pytestmark = pytest.mark.slow
TIMEOUT_S = 600
"""Per subprocess; the whole compilation takes about a minute on two cores."""


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The records of all compilations and, per module, the kernels it launches."""
    work = tmp_path_factory.mktemp("gpu-compile")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(work / "triton-cache")
    shards = max(1, min(os.cpu_count() or 1, 4))
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            [sys.executable, str(_SCRIPT), "--shard", str(i), "--shards", str(shards),
             "--json", str(work / f"shard{i}.json")],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(shards)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for i, (proc, output) in enumerate(zip(procs, outputs)):
        if proc.returncode != 0:
            pytest.fail(f"compile_kernels.py shard {i} exited with {proc.returncode}:\n{output}")
    records: list[dict] = []
    launched: dict[str, list[str]] = {}
    for i in range(shards):
        result = json.loads((work / f"shard{i}.json").read_text())
        records += result["records"]
        launched = result["launched"]
    print(f"{len(records)} compilations in {time.perf_counter() - start:.0f} s on {shards} processes")
    print(compile_kernels.format_table(records))
    return {"records": records, "launched": launched}


@pytest.mark.parametrize("target", [t.name for t in compile_kernels.TARGETS])
@pytest.mark.parametrize("case", [c.name for c in compile_kernels.CASES])
def test_compiles_without_spills(compiled: dict, case: str, target: str) -> None:
    records = [r for r in compiled["records"] if r["target"] == target and case in r["cases"]]
    assert records, f"case {case!r} compiled nothing for {target}"
    failures = [
        f"{r['kernel']} {r['config']}: {problem}"
        for r in records
        for problem in compile_kernels.problems(r)
    ]
    assert not failures, "\n".join(failures) + "\n\n" + compile_kernels.format_table(records)


@pytest.mark.parametrize("target", [t.name for t in compile_kernels.TARGETS])
def test_every_launched_kernel_is_compiled(compiled: dict, target: str) -> None:
    """A kernel a wrapper launches but no case reaches would escape this file: add a case."""
    launched = {name for names in compiled["launched"].values() for name in names}
    done = {r["kernel"] for r in compiled["records"] if r["target"] == target}
    assert launched, "found no kernel launches in rocmforge.kernels"
    assert launched <= done, f"never compiled for {target}: {sorted(launched - done)}"


def test_quant_matmul_covers_every_supported_type(compiled: dict) -> None:
    """Each GGUF type runs a decode helper of its own inside both matmul kernels."""
    from rocmforge.kernels.quant_matmul import SUPPORTED_TYPES

    assert set(compile_kernels.QUANT_TYPES) == {t.name for t in SUPPORTED_TYPES}
    for kernel in ("_gemv_kernel", "_tiled_kernel"):
        cases = {case for r in compiled["records"] if r["kernel"] == kernel for case in r["cases"]}
        for qtype in compile_kernels.QUANT_TYPES:
            covered = any(c.startswith(f"quant_matmul {qtype} ") for c in cases)
            assert covered, f"{kernel} never compiled for {qtype}"
