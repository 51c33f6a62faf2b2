"""Compile every Triton kernel of :mod:`rocmforge.kernels` ahead of time for real GPUs.

In: the table :data:`CASES` below (model shapes, dtypes, call sizes) and the targets of
:data:`TARGETS`. Out: one record per distinct compiled kernel and target (registers,
spills, shared memory, or the compiler's error), printed as a table or written as JSON
(``--json PATH``). Needs no GPU: Triton bundles ``ptxas`` and the AMD LLVM backend.

The constexprs and the signature are never written down here. Each case calls the real
launch wrapper (``paged_decode_attention``, ``quant_matmul``, ...) on CPU tensors of the
case's shapes, with every ``@triton.jit`` function's ``run`` replaced by a recorder, so
the wrapper's own config selection picks the tiles, warps and stages. The recorded
arguments then go through the same steps as ``JITFunction.run`` on a GPU (the binder's
specialisation: dtypes, 16-byte alignment, integers equal to 1 or divisible by 16; then
``_pack_args``) and into ``triton.compile(ASTSource(...), target=...)``. Per target the
wrappers see that GPU's multiprocessor count (split-K depends on it).

Must run with ``TRITON_INTERPRET`` unset (``tests/kernels/test_gpu_compile.py`` starts it
as a subprocess): under the interpreter ``triton.jit`` makes functions that cannot compile.

Usage: ``python tests/kernels/compile_kernels.py [--target cuda|hip] [--shard I --shards N]
[--only REGEX] [--json PATH]``; without ``--json`` it prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

KERNEL_PACKAGE = "rocmforge.kernels"
"""Every module in it is searched for ``@triton.jit`` functions; each one launched with
``name[grid](...)`` must be compiled by some case (``launched_kernels``)."""


# --- targets ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    backend: str
    arch: int | str
    warp_size: int
    multiprocessors: int
    """SMs / CUs: what ``torch.cuda.get_device_properties`` reports there (split-K)."""
    max_shared: int
    """Shared memory (LDS) one program may use, bytes."""
    max_regs: int | None
    """Registers per thread the hardware allows (None: the AMD compiler enforces it)."""


TARGETS = (
    # H100 SXM: 228 KiB of shared memory per SM, of which a block may opt into 227 KiB
    # (the 1 KiB difference is reserved by the driver); 255 registers per thread.
    Target("cuda", "cuda", 90, 32, multiprocessors=132, max_shared=227 * 1024, max_regs=255),
    # MI300X: 64 KiB of LDS per workgroup.
    Target("hip", "hip", "gfx942", 64, multiprocessors=304, max_shared=64 * 1024, max_regs=None),
)
TARGETS_BY_NAME = {t.name: t for t in TARGETS}


# --- the table of cases ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Model:
    name: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int


SMOLLM2_135M = Model("SmolLM2-135M", 576, 9, 3, 64, 1536)  # the default model
LLAMA_3_2_1B = Model("Llama-3.2-1B", 2048, 32, 8, 64, 8192)
LLAMA_3_1_8B = Model("Llama-3.1-8B", 4096, 32, 8, 128, 14336)
BLOCK_SIZE = 16  # EngineConfig.block_size
MAX_MODEL_LEN = 8192  # what the decode CUDA graphs pass as max_seq_len


@dataclass(frozen=True, slots=True)
class Case:
    name: str
    op: str
    """A key of ``_LAUNCHERS``: which wrapper to call."""
    model: Model
    dtype: str
    params: dict[str, object] = field(default_factory=dict)


def _attention_cases() -> list[Case]:
    cases = []
    for model in (LLAMA_3_1_8B, LLAMA_3_2_1B):
        for dtype in ("bfloat16", "float16"):
            tag = f"{model.name} {dtype}"
            # Eager decode (int64 metadata, max_seq_len = the longest context): one partition,
            # then split-K with the reduce kernel; CUDA-graph decode (int32 seq_lens and block
            # tables, max_seq_len = max_model_len); prefill.
            cases.append(Case(f"decode {tag} ctx 512", "decode", model, dtype, {"max_seq_len": 512}))
            if dtype == "bfloat16":  # float16 differs from the graph case only in index dtypes
                cases.append(Case(f"decode {tag} ctx 4096", "decode", model, dtype, {"max_seq_len": 4096}))
            cases.append(Case(
                f"decode {tag} graph", "decode", model, dtype,
                {"max_seq_len": MAX_MODEL_LEN, "index_dtype": "int32"},
            ))  # fmt: skip
            cases.append(Case(f"prefill {tag}", "prefill", model, dtype, {"max_query_len": 2048}))
    # SmolLM2: GQA group 3 (padded query rows, BLOCK_Q not a power of two); fp32 (tiles halved).
    for model, dtype in ((SMOLLM2_135M, "bfloat16"), (LLAMA_3_1_8B, "float32")):
        tag = f"{model.name} {dtype}"
        cases.append(Case(f"decode {tag} ctx 4096", "decode", model, dtype, {"max_seq_len": 4096}))
        cases.append(Case(f"prefill {tag}", "prefill", model, dtype, {"max_query_len": 2048}))
    return cases


QUANT_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
# (rows M, layer): M=1 and M=4 take the GEMV kernel (1 x 32 and 4 x 16 strips), M=16 the
# tiled kernel's smallest tile (batched decode), M=512 its largest (128 x 128, 8 warps:
# prefill); o_proj's few output tiles make the wrapper split K (an fp32 workspace),
# gate_up's many do not (a bf16 output). The 64 x 64 tile in between only for the types
# of most real files (Q4_K_M mixes Q4_K and Q6_K), to keep the run short.
QUANT_CALLS = ((1, "o_proj"), (4, "gate_up"), (16, "o_proj"), (512, "gate_up"))
QUANT_CALLS_MAIN_TYPES = ((64, "gate_up"),)
QUANT_MAIN_TYPES = ("Q4_K", "Q6_K")


def _quant_cases() -> list[Case]:
    return [
        Case(f"quant_matmul {qtype} M={m} {layer} {LLAMA_3_1_8B.name} bfloat16", "quant_matmul",
             LLAMA_3_1_8B, "bfloat16", {"qtype": qtype, "m": m, "layer": layer})
        for qtype in QUANT_TYPES
        for m, layer in QUANT_CALLS + (QUANT_CALLS_MAIN_TYPES if qtype in QUANT_MAIN_TYPES else ())
    ]  # fmt: skip


def _dequant_cases() -> list[Case]:
    """GGUFLinear's prefill path: the weight dequantized to bf16 for a BLAS GEMM."""
    return [
        Case(f"dequantize {qtype} gate_up {LLAMA_3_1_8B.name} bfloat16", "dequantize", LLAMA_3_1_8B, "bfloat16",
             {"qtype": qtype})
        for qtype in QUANT_TYPES
    ]


def _fused_cases() -> list[Case]:
    cases = []
    for model in (LLAMA_3_1_8B, SMOLLM2_135M):
        cases.append(Case(f"rms_norm {model.name} bfloat16", "rms_norm", model, "bfloat16"))
        cases.append(Case(f"rms_norm+residual {model.name} bfloat16", "rms_norm", model, "bfloat16",
                          {"residual": True}))
        cases.append(Case(f"rotary+write_kv {model.name} bfloat16", "rotary", model, "bfloat16"))
        cases.append(Case(f"silu_and_mul {model.name} bfloat16", "silu", model, "bfloat16"))
    cases.append(Case(f"rms_norm+residual {LLAMA_3_1_8B.name} float16", "rms_norm", LLAMA_3_1_8B, "float16",
                      {"residual": True}))
    cases.append(Case(f"rms_norm {LLAMA_3_1_8B.name} float32", "rms_norm", LLAMA_3_1_8B, "float32"))
    return cases


CASES: tuple[Case, ...] = (*_attention_cases(), *_quant_cases(), *_dequant_cases(), *_fused_cases())


# --- launching the wrappers on CPU tensors ---------------------------------------------------
# Everything below imports torch and the kernels lazily: the test process imports this file
# for the table only (under TRITON_INTERPRET=1).


def _launch_decode(case: Case) -> None:
    import torch

    from rocmforge.kernels.paged_attention import paged_decode_attention

    m, dtype = case.model, getattr(torch, case.dtype)
    index = getattr(torch, str(case.params.get("index_dtype", "int64")))
    max_seq_len = int(case.params["max_seq_len"])
    seqs, width = 8, -(-max_seq_len // BLOCK_SIZE)
    q = torch.empty(seqs, m.heads, m.head_dim, dtype=dtype)
    cache = torch.empty(seqs * width, BLOCK_SIZE, m.kv_heads, m.head_dim, dtype=dtype)
    tables = torch.zeros(seqs, width, dtype=index)
    seq_lens = torch.full((seqs,), max_seq_len, dtype=index)
    paged_decode_attention(q, cache, cache, tables, seq_lens, m.head_dim**-0.5, max_seq_len=max_seq_len)


def _launch_prefill(case: Case) -> None:
    import torch

    from rocmforge.kernels.paged_attention import paged_prefill_attention

    m, dtype = case.model, getattr(torch, case.dtype)
    max_query_len = int(case.params["max_query_len"])
    seqs, width = 2, -(-max_query_len // BLOCK_SIZE)
    q = torch.empty(seqs * max_query_len, m.heads, m.head_dim, dtype=dtype)
    cache = torch.empty(seqs * width, BLOCK_SIZE, m.kv_heads, m.head_dim, dtype=dtype)
    tables = torch.zeros(seqs, width, dtype=torch.int64)
    seq_lens = torch.full((seqs,), max_query_len, dtype=torch.int64)
    starts = torch.arange(seqs + 1, dtype=torch.int64) * max_query_len
    paged_prefill_attention(
        q, cache, cache, tables, seq_lens, starts, m.head_dim**-0.5, max_query_len=max_query_len
    )


def _launch_quant_matmul(case: Case) -> None:
    import torch
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    from rocmforge.kernels.quant_matmul import quant_matmul

    m = case.model
    qtype = GGMLQuantizationType[str(case.params["qtype"])]
    n, k = {
        "o_proj": (m.hidden, m.heads * m.head_dim),
        "gate_up": (2 * m.intermediate, m.hidden),
    }[str(case.params["layer"])]
    block_elements, block_bytes = GGML_QUANT_SIZES[qtype]
    weight = torch.empty(n, k // block_elements * block_bytes, dtype=torch.uint8)
    x = torch.empty(int(case.params["m"]), k, dtype=getattr(torch, case.dtype))
    quant_matmul(x, weight, qtype)


def _launch_dequantize(case: Case) -> None:
    import torch
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    from rocmforge.kernels.gguf_dequant import dequantize_weight

    m = case.model
    qtype = GGMLQuantizationType[str(case.params["qtype"])]
    block_elements, block_bytes = GGML_QUANT_SIZES[qtype]
    weight = torch.empty(2 * m.intermediate, m.hidden // block_elements * block_bytes, dtype=torch.uint8)
    dequantize_weight(weight, qtype, m.hidden, getattr(torch, case.dtype))


def _launch_rms_norm(case: Case) -> None:
    import torch

    from rocmforge.kernels.fused import rms_norm

    dtype = getattr(torch, case.dtype)
    x = torch.empty(16, case.model.hidden, dtype=dtype)
    residual = torch.empty_like(x) if case.params.get("residual") else None
    rms_norm(x, torch.empty(case.model.hidden, dtype=dtype), 1e-5, residual=residual)


def _launch_rotary(case: Case) -> None:
    import torch

    from rocmforge.kernels.fused import apply_rotary_and_write_kv

    m, dtype, tokens = case.model, getattr(torch, case.dtype), 16
    q_size, kv_size = m.heads * m.head_dim, m.kv_heads * m.head_dim
    qkv = torch.empty(tokens, q_size + 2 * kv_size, dtype=dtype)  # as llama.Attention splits it
    qk, v = qkv.split([q_size + kv_size, kv_size], dim=-1)
    qk = qk.reshape(tokens, m.heads + m.kv_heads, m.head_dim)
    v = v.reshape(tokens, m.kv_heads, m.head_dim)
    cos = torch.empty(tokens, 1, m.head_dim // 2)  # RotaryEmbedding: fp32
    cache = torch.empty(64, BLOCK_SIZE, m.kv_heads, m.head_dim, dtype=dtype)
    slots = torch.arange(tokens, dtype=torch.int64)
    apply_rotary_and_write_kv(qk, v, cos, cos.clone(), cache, cache.clone(), slots, m.heads)


def _launch_silu(case: Case) -> None:
    import torch

    from rocmforge.kernels.fused import silu_and_mul

    silu_and_mul(torch.empty(16, 2 * case.model.intermediate, dtype=getattr(torch, case.dtype)))


_LAUNCHERS: dict[str, Callable[[Case], None]] = {
    "decode": _launch_decode,
    "prefill": _launch_prefill,
    "quant_matmul": _launch_quant_matmul,
    "dequantize": _launch_dequantize,
    "rms_norm": _launch_rms_norm,
    "rotary": _launch_rotary,
    "silu": _launch_silu,
}


# --- recording launches ----------------------------------------------------------------------


@dataclass(slots=True)
class Launch:
    fn: object
    """The ``JITFunction`` launched."""
    args: tuple
    kwargs: dict


@contextlib.contextmanager
def _recording(target: Target) -> Iterator[list[Launch]]:
    """Within: every kernel launch from the modules is recorded instead of run, the
    wrappers accept CPU tensors, and see ``target``'s multiprocessor count."""
    from triton.runtime.jit import JITFunction

    launches: list[Launch] = []
    undo: list[tuple[object, str, object]] = []

    def patch(obj: object, name: str, value: object) -> None:
        undo.append((obj, name, vars(obj).get(name, _MISSING)))  # a JITFunction's run: its class's
        setattr(obj, name, value)

    def recorder(fn: JITFunction) -> Callable[..., None]:
        def run(*args: object, grid: object, warmup: bool, **kwargs: object) -> None:
            launches.append(Launch(fn, args, kwargs))

        return run

    try:
        for module in map(importlib.import_module, kernel_modules()):
            for obj in list(vars(module).values()):
                if isinstance(obj, JITFunction):
                    patch(obj, "run", recorder(obj))
            if hasattr(module, "kernels_usable"):  # the wrappers' "can Triton run here" check
                patch(module, "kernels_usable", lambda device: True)
            if hasattr(module, "_multiprocessors"):  # quant_matmul's split-K (the CPU counts 1)
                patch(module, "_multiprocessors", lambda device: target.multiprocessors)
        yield launches
    finally:
        for obj, name, old in reversed(undo):
            if old is _MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, old)


_MISSING = object()


def kernel_modules() -> list[str]:
    package = importlib.import_module(KERNEL_PACKAGE)
    return [f"{KERNEL_PACKAGE}.{m.name}" for m in pkgutil.iter_modules(package.__path__)]


def launched_kernels() -> dict[str, set[str]]:
    """Per kernel module, the ``@triton.jit`` functions it launches (``name[grid](...)``)."""
    from triton.runtime.jit import JITFunction

    found = {}
    for name in kernel_modules():
        module = importlib.import_module(name)
        source = Path(module.__file__).read_text(encoding="utf-8")
        jitted = {n for n, obj in vars(module).items() if isinstance(obj, JITFunction)}
        found[name] = {n for n in re.findall(r"\b(\w+)\[", source) if n in jitted}
    return found


# --- compiling -------------------------------------------------------------------------------


@dataclass(slots=True)
class Job:
    target: Target
    launch: Launch
    cases: list[str]
    kernel: str
    config: str
    key: str
    packed: tuple


def _pack(launch: Launch, target: Target) -> tuple[tuple, str, str]:
    """What ``JITFunction.run`` would compile for these arguments on ``target``:
    ``(signature, constexprs, attrs, options)``, a readable config, a dedup key."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn, kwargs = launch.fn, dict(launch.kwargs)
    backend = make_backend(GPUTarget(target.backend, target.arch, target.warp_size))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    names = list(fn.arg_names)

    def show(value: object) -> str:
        return getattr(value, "__name__", None) or str(value)

    pointers = "/".join(v[1:] for v in signature.values() if v.startswith("*"))
    config = " ".join(
        [f"ptrs={pointers}"]
        + [f"{names[path[0]]}={show(value)}" for path, value in sorted(constexprs.items())]
        + [f"num_warps={options.num_warps}", f"num_stages={options.num_stages}"]
        + ([] if options.enable_fp_fusion else ["fp_fusion=off"])
    )
    sig = ",".join(f"{k}:{v}" for k, v in signature.items() if v != "constexpr")
    divisible = ",".join(names[p[0]] for p, a in sorted(attrs.items()) if a)
    key = f"{target.name}|{fn.__name__}|{config}|{sig}|{divisible}"
    return (signature, constexprs, attrs, options), config, key


def plan(targets: tuple[Target, ...], cases: tuple[Case, ...] = CASES) -> list[Job]:
    """Record each case's launches per target; one job per distinct compilation."""
    jobs: dict[str, Job] = {}
    for target in targets:
        for case in cases:
            with _recording(target) as launches:
                _LAUNCHERS[case.op](case)
            if not launches:
                raise RuntimeError(f"case {case.name!r} launched no kernel")
            for launch in launches:
                packed, config, key = _pack(launch, target)
                if key in jobs:
                    jobs[key].cases.append(case.name)
                else:
                    jobs[key] = Job(target, launch, [case.name], launch.fn.__name__, config, key, packed)
    return list(jobs.values())


@dataclass(slots=True)
class Record:
    target: str
    kernel: str
    config: str
    cases: list[str]
    ok: bool
    error: str | None = None
    n_regs: int | None = None
    n_spills: int | None = None
    """Local (scratch) memory per thread / 4: what Triton's launcher reports as n_spills."""
    shared: int | None = None
    """Bytes of shared memory (LDS) a program needs: static plus Triton's dynamic."""
    num_warps: int | None = None
    detail: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    """The compiler's performance warnings (ptxas)."""
    seconds: float = 0.0


def compile_job(job: Job) -> Record:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs, options = job.packed
    record = Record(job.target.name, job.kernel, job.config, job.cases, ok=False, num_warps=options.num_warps)
    start = time.perf_counter()
    knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()  # ptxas -v output, printed by Triton (only when it compiles: no cache hit)
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(
                ASTSource(fn=job.launch.fn, signature=signature, constexprs=constexprs, attrs=attrs),
                target=GPUTarget(job.target.backend, job.target.arch, job.target.warp_size),
                options=options.__dict__,
            )
    except Exception as exc:
        record.error = f"{type(exc).__name__}: {exc}"[-4000:]
        record.seconds = time.perf_counter() - start
        return record
    record.seconds = time.perf_counter() - start
    # Reading the resource usage is not the compiler's job: an error here is raised.
    if job.target.backend == "cuda":
        usage = _cuda_usage(compiled.asm["cubin"], job.kernel)
        stores = re.search(r"(\d+) bytes spill stores", log.getvalue())
        if stores:
            usage["spill_stores"] = int(stores.group(1))
        record.notes = re.findall(r"Potential Performance Loss: (.*)", log.getvalue())
    else:
        usage = _hip_usage(compiled.asm["amdgcn"])
        if usage["sgpr_spills"]:
            record.notes = [f"{usage['sgpr_spills']} SGPRs spilled into VGPR lanes (not memory)"]
    record.ok = True
    record.n_regs = usage.pop("regs")
    record.n_spills = usage["local_bytes"] // 4
    record.shared = usage["static_shared"] + compiled.metadata.shared
    record.detail = usage
    return record


def _cuda_usage(cubin: bytes, kernel: str) -> dict[str, int]:
    """Registers, stack, local and static shared bytes of ``kernel`` in ``cubin``, as
    ``cuobjdump --dump-resource-usage`` reads them (what the driver reports at load)."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
            check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
    line = re.search(rf"Function {re.escape(kernel)}:\s*\n\s*(.*)", out)
    if line is None:
        raise RuntimeError(f"no resource usage for {kernel} in cuobjdump output:\n{out}")
    fields = {name: int(value) for name, value in re.findall(r"(\w+):(\d+)", line.group(1))}
    # The driver's local size per thread (Triton's n_spills * 4) counts the stack frame,
    # where ptxas puts spilled registers, and any other local memory.
    return {
        "regs": fields["REG"],
        "local_bytes": fields["STACK"] + fields["LOCAL"],
        "static_shared": fields["SHARED"],
    }


def _hip_usage(amdgcn: str) -> dict[str, int]:
    """VGPRs (n_regs), AGPRs, SGPRs, spill counts, scratch and static LDS bytes from the
    kernel's AMDGPU metadata in the assembly (what ``hipFuncGetAttribute`` reports)."""

    def meta(name: str) -> int:
        found = re.search(rf"^\s*(?:- )?\.{name}:\s+(\d+)", amdgcn, re.MULTILINE)
        if found is None:
            raise RuntimeError(f"no .{name} in the AMDGPU metadata")
        return int(found.group(1))

    occupancy = re.search(r"; Occupancy: (\d+)", amdgcn)
    return {
        "regs": meta("vgpr_count"),
        "agprs": meta("agpr_count"),
        "sgprs": meta("sgpr_count"),
        "vgpr_spills": meta("vgpr_spill_count"),
        "sgpr_spills": meta("sgpr_spill_count"),
        "local_bytes": meta("private_segment_fixed_size"),
        "static_shared": meta("group_segment_fixed_size"),
        "occupancy": int(occupancy.group(1)) if occupancy else -1,
    }


def problems(record: dict) -> list[str]:
    """Why a compiled kernel would fail or be slow on its target (empty: fine)."""
    if not record["ok"]:
        return [f"does not compile: {record['error']}"]
    target = TARGETS_BY_NAME[record["target"]]
    found = []
    detail = record["detail"]
    # SGPR spills are not counted: LLVM parks them in VGPR lanes, not in memory (a scalar
    # spill that reached scratch would show as local bytes).
    if record["n_spills"] or detail.get("vgpr_spills") or detail.get("spill_stores"):
        found.append(f"spills: {record['n_spills']} words of local memory per thread, {detail}")
    if target.max_regs is not None:
        if record["n_regs"] > target.max_regs:
            found.append(f"{record['n_regs']} registers per thread > {target.max_regs}")
        threads = record["num_warps"] * target.warp_size
        if record["n_regs"] * threads > 65536:
            found.append(f"{record['n_regs']} registers x {threads} threads > the 64K register file")
    if record["shared"] > target.max_shared:
        found.append(f"{record['shared']} bytes of shared memory > {target.max_shared}")
    return found


def format_table(records: list[dict]) -> str:
    rows = [("target", "kernel", "regs", "spills", "shared", "s", "config / cases")]
    for r in sorted(records, key=lambda r: (r["kernel"], r["target"], r["config"])):
        rows.append((
            r["target"], r["kernel"],
            str(r["n_regs"]) if r["ok"] else "FAIL", str(r["n_spills"]), str(r["shared"]),
            f"{r['seconds']:.1f}",
            f"{r['config']}  [{'; '.join(r['cases'])}]" + "".join(f"  NOTE: {n}" for n in r["notes"]),
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1] for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=sorted(TARGETS_BY_NAME), action="append")
    parser.add_argument("--shard", type=int, default=0)
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--only", help="compile only the cases whose name matches this regex")
    parser.add_argument("--json", help="write the records here instead of printing a table")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("TRITON_INTERPRET is set: unset it, the interpreter's kernels cannot compile")
    targets = tuple(TARGETS_BY_NAME[t] for t in args.target) if args.target else TARGETS
    cases = tuple(c for c in CASES if args.only is None or re.search(args.only, c.name))
    jobs = plan(targets, cases)[args.shard :: args.shards]
    records = [asdict(compile_job(job)) for job in jobs]
    if args.json:
        launched = {module: sorted(names) for module, names in launched_kernels().items()}
        Path(args.json).write_text(json.dumps({"records": records, "launched": launched}), encoding="utf-8")
    else:
        print(format_table(records))
        for r in records:
            for problem in problems(r):
                print(f"PROBLEM {r['target']} {r['kernel']} {r['config']}: {problem}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
