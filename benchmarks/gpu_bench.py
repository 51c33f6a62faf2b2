"""The GPU benchmark in one command: rocmforge against HF transformers and llama.cpp on
random-weight GGUF files of Llama-3.2-1B and Llama-3.1-8B shape, then serving throughput.

In: ``--out DIR``, where the GGUF files are written once (``write_random_gguf``, vocabulary
49,152) and reused; which models and types to run. Out: plain-text tables on stdout, and
every number as JSON in ``--json PATH``:

1. per (model, type): rocmforge prompt processing (``--pp`` tokens in one request, best of
   ``--runs``) and single-stream decode (``--tg`` tokens after a 16-token prompt, greedy,
   ignore_eos, best of ``--runs``) in tokens/s; bytes read per decode token; the bandwidth
   roofline and the fraction of it reached; llama.cpp pp and tg on the same file (when
   ``llama_cpp`` is importable: all layers offloaded, flash attention) and the ratios
   rocmforge / llama.cpp. rocmforge keeps quantized files quantized
   (``weight_format="quantized"``) and computes in bf16 on the GPU (fp32 on the CPU).
2. per model: HF transformers ``generate()`` decode tokens/s (``LlamaForCausalLM`` of the
   same shape with random weights, bf16 on the GPU, eager attention, greedy,
   ``min_new_tokens`` = ``max_new_tokens``) and its roofline fraction.
3. throughput vs concurrency on one file through ``benchmarks/throughput.py``'s harness:
   output tokens/s, TTFT and inter-token latency percentiles.

Definitions. Bytes per decode token = the weights as the engine holds them (rocmforge and
HF: every parameter and buffer of the model, tied tensors once; llama.cpp: the file's
tensors), less the embedding table unless the output head reads it (a step reads one row
of it), + the K and V read by attention at the mean context of the decode (prompt + tg/2
tokens, in the engine's KV dtype; llama.cpp's is fp16). Copy bandwidth = 2 x bytes / time of
a large device-to-device copy. Roofline = bandwidth / bytes per token; "% roofline" = decode
tokens/s over it. One engine is on the device at a time; memory is freed between rows.

    python benchmarks/gpu_bench.py --out /tmp/bench --json /tmp/bench/results.json
    python benchmarks/gpu_bench.py --out /tmp/bench --models 8b --types q4_k_m --throughput-type q4_k_m
    python benchmarks/gpu_bench.py --smoke --json /tmp/smoke.json   # CPU, tiny shapes, every path
"""

from __future__ import annotations

# llama.cpp first: its CUDA build crashes when numpy was imported before it.
try:
    import llama_cpp
except ImportError:
    llama_cpp = None

import argparse
import asyncio
import gc
import itertools
import json
import logging
import math
import os
import platform
import random
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from gguf import GGMLQuantizationType
from throughput import LevelResult, measure_levels, pct, print_table

from rocmforge import LLM, SamplingParams
from rocmforge.engine.memory import module_bytes
from rocmforge.gguf import read_gguf
from rocmforge.synthetic import (
    LLAMA_3_1_8B,
    LLAMA_3_2_1B,
    RANDOM_TYPES,
    SPECIAL_TOKENS,
    SyntheticSpec,
    TensorTypeChooser,
    q4_k_m_types,
    write_random_gguf,
)

logger = logging.getLogger("gpu_bench")

SMOKE_SPEC = SyntheticSpec(
    vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4, num_kv_heads=2, max_context=512
)
"""Tiny, but wide enough (256) for K-quant super-blocks, so Q4_K_M really is K-quants."""
MODELS: dict[str, tuple[str, SyntheticSpec]] = {
    "1b": ("llama-3.2-1b-shape", LLAMA_3_2_1B),
    "8b": ("llama-3.1-8b-shape", LLAMA_3_1_8B),
    "tiny": ("tiny-smoke", SMOKE_SPEC),
}
FLOAT_TYPES = {"f32", "f16", "bf16"}
TYPES: dict[str, Callable[[SyntheticSpec], GGMLQuantizationType | TensorTypeChooser]] = {
    **{t.name.lower(): (lambda _spec, t=t: t) for t in sorted(RANDOM_TYPES, key=lambda t: t.name)},
    "q4_k_m": q4_k_m_types,
}
ENGINES = ("rocmforge", "hf", "llama.cpp")
DECODE_PROMPT_TOKENS = 16
"""Prompt length before the single-stream decode."""
MIB = 1 << 20


@dataclass(slots=True)
class Speed:
    """One engine on one model: tokens/s and where decode stands against the roofline."""

    tg_tokens_per_s: float
    bytes_per_token: int
    roofline_tokens_per_s: float
    pp_tokens_per_s: float | None = None

    @property
    def roofline_fraction(self) -> float:
        return self.tg_tokens_per_s / self.roofline_tokens_per_s

    def as_dict(self) -> dict[str, float | int]:
        """Every measured number (no ``pp_tokens_per_s`` where prompt processing was not measured)."""
        numbers = {k: v for k, v in asdict(self).items() if v is not None}
        return {**numbers, "roofline_fraction": self.roofline_fraction}


@dataclass(slots=True)
class Row:
    model: str
    type: str
    file: str
    file_bytes: int
    rocmforge: Speed | None = None
    llama_cpp: Speed | None = None

    def ratio(self, attr: str) -> float | None:
        if self.rocmforge is None or self.llama_cpp is None:
            return None
        return getattr(self.rocmforge, attr) / getattr(self.llama_cpp, attr)


@dataclass(frozen=True, slots=True)
class Setup:
    device: torch.device
    dtype: torch.dtype
    pp: int
    tg: int
    runs: int
    bandwidth: float
    """Measured device copy bandwidth, bytes/s."""


# --- files ----------------------------------------------------------------------------------


def ensure_file(out_dir: Path, model: str, type_name: str, seed: int) -> Path:
    """The GGUF file of ``model`` x ``type_name`` in ``out_dir``, written first if missing
    (to a temporary name, renamed when complete, so an interrupted write is never reused)."""
    stem, spec = MODELS[model]
    path = out_dir / f"{stem}-{type_name}.gguf"
    if path.exists():
        print(f"reusing {path} ({path.stat().st_size / 2**30:.2f} GiB)", flush=True)
        return path
    incomplete = path.with_suffix(".gguf.partial")
    start = time.perf_counter()
    write_random_gguf(incomplete, spec, TYPES[type_name](spec), seed=seed)
    os.replace(incomplete, path)
    print(f"wrote {path} ({path.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - start:.1f} s", flush=True)
    return path


def token_ids(vocab_size: int, n: int) -> list[int]:
    """``n`` fixed pseudo-random ordinary (non-special) token ids."""
    rng = random.Random(0)
    return [rng.randrange(len(SPECIAL_TOKENS), vocab_size) for _ in range(n)]


# --- measurements ---------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def copy_bandwidth(device: torch.device, nbytes: int, copies: int = 10, runs: int = 5) -> float:
    """Bytes/s of a device-to-device copy: each copy reads and writes ``nbytes``."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    synchronize(device)
    best = math.inf
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(copies):
            dst.copy_(src)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    del src, dst
    free_memory(device)
    return 2 * nbytes * copies / best


def decode_weight_bytes(model: torch.nn.Module, embedding: torch.nn.Module, head: torch.nn.Module) -> int:
    """Weight bytes one decode step reads: every parameter and buffer once (tied weights
    once), except the embedding table, of which a step reads one row — unless the output
    head reads it whole (tied)."""

    def storages(module: torch.nn.Module) -> dict[int, int]:
        return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in itertools.chain(module.parameters(), module.buffers())}

    head_storages = storages(head)
    table = sum(nbytes for ptr, nbytes in storages(embedding).items() if ptr not in head_storages)
    return module_bytes(model) - table


def kv_bytes_read(num_layers: int, num_kv_heads: int, head_dim: int, element_size: int, context: float) -> int:
    """K and V bytes one decode step reads at ``context`` tokens of context."""
    return int(2 * num_layers * num_kv_heads * head_dim * element_size * context)


def mean_decode_context(tg: int) -> float:
    return DECODE_PROMPT_TOKENS + tg / 2


def bench_rocmforge(path: Path, setup: Setup, weight_format: str) -> Speed:
    llm = LLM(
        path, device=setup.device.type, dtype=setup.dtype, weight_format=weight_format, max_num_seqs=1,
        max_model_len=setup.pp + setup.tg + 64, max_num_batched_tokens=max(2048, setup.pp),
        enable_prefix_caching=False,
    )
    ids = token_ids(llm.config.vocab_size, setup.pp)
    decode = SamplingParams(max_tokens=setup.tg, temperature=0.0, ignore_eos=True)
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    llm.generate(ids, one)  # warm-up: kernels, graphs, allocator
    list(llm.stream(ids[:DECODE_PROMPT_TOKENS], decode))
    pp_times, tg_speeds = [], []
    for _ in range(setup.runs):
        start = time.perf_counter()
        llm.generate(ids, one)
        pp_times.append(time.perf_counter() - start)
        stamps = [time.perf_counter() for out in llm.stream(ids[:DECODE_PROMPT_TOKENS], decode) if out.new_token_ids]
        tg_speeds.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    config = llm.config
    element = torch.empty((), dtype=llm.dtype).element_size()
    model = llm.engine.runner.model
    nbytes = decode_weight_bytes(model, model.embed_tokens, model.lm_head) + kv_bytes_read(
        config.num_layers, config.num_kv_heads, config.head_dim, element, mean_decode_context(setup.tg))
    return Speed(max(tg_speeds), nbytes, setup.bandwidth / nbytes, pp_tokens_per_s=setup.pp / min(pp_times))


def bench_llama_cpp(path: Path, spec: SyntheticSpec, setup: Setup) -> Speed:
    threads = os.cpu_count() or 1
    llm = llama_cpp.Llama(
        model_path=str(path), n_gpu_layers=-1, flash_attn=True, n_ctx=setup.pp + setup.tg + 64,
        n_batch=setup.pp, n_ubatch=setup.pp, n_threads=threads, n_threads_batch=threads, verbose=False,
    )
    try:
        ids = token_ids(llm.n_vocab(), setup.pp)

        def prefill(tokens: list[int]) -> float:
            llm.reset()
            start = time.perf_counter()
            llm.eval(tokens)
            llama_cpp.llama_synchronize(llm.ctx)
            return time.perf_counter() - start

        def decode() -> float:
            prefill(ids[:DECODE_PROMPT_TOKENS])
            token = llm.sample(temp=0.0)
            start = time.perf_counter()
            for _ in range(setup.tg - 1):
                llm.eval([token])
                token = llm.sample(temp=0.0)
            return (setup.tg - 1) / (time.perf_counter() - start)

        prefill(ids)  # warm-up
        decode()
        pp_time = min(prefill(ids) for _ in range(setup.runs))
        tg_speed = max(decode() for _ in range(setup.runs))
        with read_gguf(path) as gguf:
            weights = sum(info.nbytes for info in gguf.tensors.values())
            if "output.weight" in gguf.tensors:  # untied: decode reads one row of token_embd
                weights -= gguf.tensors["token_embd.weight"].nbytes
        nbytes = weights + kv_bytes_read(spec.num_layers, spec.num_kv_heads, spec.head_dim, 2,
                                         mean_decode_context(setup.tg))
        return Speed(tg_speed, nbytes, setup.bandwidth / nbytes, pp_tokens_per_s=setup.pp / pp_time)
    finally:
        llm.close()  # frees its device memory now, not at garbage collection


def bench_hf(spec: SyntheticSpec, setup: Setup) -> Speed:
    """HF transformers decode: (time of ``generate`` for tg new tokens - time for 1 token,
    which is the prefill and the first token) per further token."""
    import transformers

    config = transformers.LlamaConfig(**spec.hf_config(), attn_implementation="eager")
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(setup.dtype)  # random init straight in the compute dtype
    try:
        with torch.device(setup.device):
            model = transformers.LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    prompt = torch.tensor([token_ids(spec.vocab_size, DECODE_PROMPT_TOKENS)], device=setup.device)
    mask = torch.ones_like(prompt)

    def generate(n: int) -> float:
        synchronize(setup.device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(prompt, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 pad_token_id=0)
        synchronize(setup.device)
        elapsed = time.perf_counter() - start
        if out.shape[1] != prompt.shape[1] + n:
            raise RuntimeError(f"HF generate made {out.shape[1] - prompt.shape[1]} tokens, not {n}")
        return elapsed

    generate(setup.tg)  # warm-up
    first = min(generate(1) for _ in range(setup.runs))
    full = min(generate(setup.tg) for _ in range(setup.runs))
    element = torch.empty((), dtype=setup.dtype).element_size()
    nbytes = decode_weight_bytes(model, model.model.embed_tokens, model.lm_head) + kv_bytes_read(
        spec.num_layers, spec.num_kv_heads, spec.head_dim, element, mean_decode_context(setup.tg))
    return Speed((setup.tg - 1) / (full - first), nbytes, setup.bandwidth / nbytes)


def bench_throughput(path: Path, setup: Setup, weight_format: str, levels: list[tuple[int, int]],
                     prompt_tokens: int, max_tokens: int) -> list[LevelResult]:
    llm = LLM(
        path, device=setup.device.type, dtype=setup.dtype, weight_format=weight_format,
        max_num_seqs=max(level for level, _ in levels), max_model_len=prompt_tokens + max_tokens + 16,
        enable_prefix_caching=False,
    )
    return asyncio.run(measure_levels(llm, levels, prompt_tokens, max_tokens))


# --- output ---------------------------------------------------------------------------------


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Plain text, first column left-aligned, the others right-aligned, two spaces apart."""
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows)]
    lines = []
    for cells in [headers, *rows]:
        parts = [cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
        lines.append("  ".join(parts).rstrip())
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


MAIN_HEADERS = (
    "model", "type", "file GiB", "pp tok/s", "tg tok/s", "MiB/token", "roofline tok/s", "% roofline",
    "llama.cpp pp", "llama.cpp tg", "llama.cpp % roofline", "pp vs llama.cpp", "tg vs llama.cpp",
)
HF_HEADERS = ("model", "HF tg tok/s", "MiB/token", "roofline tok/s", "% roofline")


def main_table(rows: list[Row]) -> str:
    def cell(speed: Speed | None, value: Callable[[Speed], float | None]) -> str:
        return "n/a" if speed is None else fmt(value(speed))

    def ratio(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}x"

    cells = []
    for r in rows:
        rf, lc = r.rocmforge, r.llama_cpp
        cells.append((
            r.model, r.type, f"{r.file_bytes / 2**30:.2f}",
            cell(rf, lambda s: s.pp_tokens_per_s), cell(rf, lambda s: s.tg_tokens_per_s),
            cell(rf, lambda s: s.bytes_per_token / MIB), cell(rf, lambda s: s.roofline_tokens_per_s),
            cell(rf, lambda s: 100 * s.roofline_fraction),
            cell(lc, lambda s: s.pp_tokens_per_s), cell(lc, lambda s: s.tg_tokens_per_s),
            cell(lc, lambda s: 100 * s.roofline_fraction),
            ratio(r.ratio("pp_tokens_per_s")), ratio(r.ratio("tg_tokens_per_s")),
        ))
    return format_table(MAIN_HEADERS, cells)


def hf_table(hf: dict[str, Speed]) -> str:
    cells = [(model, fmt(s.tg_tokens_per_s), fmt(s.bytes_per_token / MIB), fmt(s.roofline_tokens_per_s),
              fmt(100 * s.roofline_fraction)) for model, s in hf.items()]
    return format_table(HF_HEADERS, cells)


def level_dict(r: LevelResult) -> dict[str, float | int]:
    return {
        "concurrency": r.concurrency, "requests": r.requests, "output_tokens": r.output_tokens, "wall_s": r.wall_s,
        "output_tokens_per_s": r.tokens_per_s, "ttft_p50_ms": pct(r.ttft_ms, 50), "ttft_p99_ms": pct(r.ttft_ms, 99),
        "itl_p50_ms": pct(r.itl_ms, 50), "itl_p99_ms": pct(r.itl_ms, 99),
    }


# --- main -----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="folder for the GGUF files (required unless --smoke)")
    parser.add_argument("--json", type=Path, help="also write every number to this JSON file")
    parser.add_argument("--models", default="1b,8b", help=f"comma-separated: {', '.join(MODELS)}")
    parser.add_argument("--types", default="f16,q8_0,q4_0,q4_k_m", help=f"comma-separated: {', '.join(TYPES)}")
    parser.add_argument("--pp", type=int, default=512, help="prompt tokens for prompt processing")
    parser.add_argument("--tg", type=int, default=128, help="decoded tokens for single-stream decode")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per measurement (best is kept)")
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated: {', '.join(ENGINES)}")
    parser.add_argument("--throughput-model", default="8b")
    parser.add_argument("--throughput-type", default="f16")
    parser.add_argument("--concurrency", default="1,8,32,128", help="comma-separated levels ('' skips)")
    parser.add_argument("--throughput-prompt-tokens", type=int, default=128)
    parser.add_argument("--throughput-max-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU, a tiny model, f16 and q4_k_m, pp 32, tg 8, concurrency 1,2: every code path fast")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    if args.smoke:
        args.models, args.types, args.pp, args.tg, args.runs = "tiny", "f16,q4_k_m", 32, 8, 2
        args.throughput_model, args.throughput_type, args.concurrency = "tiny", "f16", "1,2"
        args.throughput_prompt_tokens, args.throughput_max_tokens = 16, 8
    elif args.out is None:
        parser.error("--out is required (the folder for the GGUF files)")
    for name in args.models.split(","):
        if name not in MODELS:
            parser.error(f"unknown model {name!r} (have: {', '.join(MODELS)})")
    for name in [*args.types.split(","), args.throughput_type]:
        if name not in TYPES:
            parser.error(f"unknown type {name!r} (have: {', '.join(TYPES)})")
    if args.throughput_model not in MODELS:
        parser.error(f"unknown model {args.throughput_model!r} (have: {', '.join(MODELS)})")
    for name in args.engines.split(","):
        if name not in ENGINES:
            parser.error(f"unknown engine {name!r} (have: {', '.join(ENGINES)})")
    return args


def weight_format(type_name: str) -> str:
    return "dense" if type_name in FLOAT_TYPES else "quantized"


def requests_per_level(concurrency: int, smoke: bool) -> int:
    """Enough requests that the level runs at full concurrency for most of its time."""
    return 2 * concurrency if smoke else max(8, 2 * concurrency)


@dataclass(slots=True)
class Report:
    """Everything measured so far; saved as JSON after every measurement, so a run cut short
    (a time limit, a crash) still leaves its numbers behind."""

    header: dict[str, Any]
    json_path: Path | None
    rows: list[Row] = field(default_factory=list)
    hf: dict[str, Speed] = field(default_factory=dict)
    throughput: dict[str, Any] | None = None
    errors: list[str] = field(default_factory=list)

    def save(self) -> None:
        if self.json_path is None:
            return
        rows = [
            {"model": r.model, "type": r.type, "file": r.file, "file_bytes": r.file_bytes,
             "rocmforge": r.rocmforge.as_dict() if r.rocmforge else None,
             "llama_cpp": r.llama_cpp.as_dict() if r.llama_cpp else None,
             "pp_ratio_vs_llama_cpp": r.ratio("pp_tokens_per_s"), "tg_ratio_vs_llama_cpp": r.ratio("tg_tokens_per_s")}
            for r in self.rows
        ]
        hf = [{"model": model, **speed.as_dict()} for model, speed in self.hf.items()]
        self.json_path.write_text(json.dumps(
            {**self.header, "rows": rows, "hf": hf, "throughput": self.throughput, "errors": self.errors}, indent=2))


def run(args: argparse.Namespace, out_dir: Path) -> int:
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    dtype_name = str(dtype).removeprefix("torch.")
    engines = set(args.engines.split(","))
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    command = f"python {shlex.join(sys.argv)}"
    print(f"command: {command}")
    print(f"device:  {device} ({device_name}), dtype {dtype_name}, torch {torch.__version__}")
    print(f"llama.cpp: {f'llama-cpp-python {llama_cpp.__version__}' if llama_cpp else 'not importable: skipped'}")
    bandwidth = copy_bandwidth(device, (1 << 30) if device.type == "cuda" else (64 << 20))
    print(f"copy bandwidth: {bandwidth / 1e9:.1f} GB/s", flush=True)
    setup = Setup(device, dtype, args.pp, args.tg, args.runs, bandwidth)
    report = Report({
        "command": command, "device": device_name, "dtype": dtype_name, "torch": torch.__version__,
        "smoke": args.smoke, "copy_bandwidth_bytes_per_s": bandwidth,
        "llama_cpp_version": llama_cpp.__version__ if llama_cpp else None,
        "settings": {"pp": args.pp, "tg": args.tg, "runs": args.runs, "decode_prompt_tokens": DECODE_PROMPT_TOKENS},
    }, args.json)

    def attempt(what: str, measure: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        try:
            result = measure()
        except Exception as exc:  # one failed row must not cost the rest of the GPU run
            logger.exception("%s failed", what)
            report.errors.append(f"{what}: {exc!r}")
            result = None
        # The engine is unreachable now (also from the traceback, gone with the except block).
        free_memory(device)
        if result is None:
            return None
        summary = f"  {what}: {time.perf_counter() - start:.1f} s"
        if isinstance(result, Speed):
            if result.pp_tokens_per_s is not None:
                summary += f", pp {result.pp_tokens_per_s:.1f} tok/s"
            summary += f", tg {result.tg_tokens_per_s:.1f} tok/s, {100 * result.roofline_fraction:.1f} % roofline"
        print(summary, flush=True)
        return result

    for model in args.models.split(","):
        for type_name in args.types.split(","):
            path = ensure_file(out_dir, model, type_name, args.seed)
            row = Row(model, type_name, str(path), path.stat().st_size)
            report.rows.append(row)
            if "rocmforge" in engines:
                row.rocmforge = attempt(f"rocmforge {model} {type_name}",
                                        partial(bench_rocmforge, path, setup, weight_format(type_name)))
                report.save()
            if "llama.cpp" in engines and llama_cpp is not None:
                row.llama_cpp = attempt(f"llama.cpp {model} {type_name}",
                                        partial(bench_llama_cpp, path, MODELS[model][1], setup))
                report.save()
        if "hf" in engines:
            speed = attempt(f"HF transformers {model}", partial(bench_hf, MODELS[model][1], setup))
            if speed is not None:
                report.hf[model] = speed
            report.save()

    print(f"\nSingle stream: rocmforge and llama.cpp on the same file (pp {args.pp} tokens, tg {args.tg} tokens "
          f"after {DECODE_PROMPT_TOKENS}, best of {args.runs})")
    print(main_table(report.rows))
    if report.hf:
        print(f"\nHF transformers generate() ({dtype_name}, eager, greedy), decode only")
        print(hf_table(report.hf))

    levels = [(int(c), requests_per_level(int(c), args.smoke)) for c in args.concurrency.split(",") if c]
    if levels:
        path = ensure_file(out_dir, args.throughput_model, args.throughput_type, args.seed)
        print(f"\nThroughput vs concurrency: {path.name}, prompt {args.throughput_prompt_tokens} tokens, "
              f"{args.throughput_max_tokens} output tokens each (greedy, ignore_eos)", flush=True)
        results = attempt(
            f"throughput {args.throughput_model} {args.throughput_type}",
            partial(bench_throughput, path, setup, weight_format(args.throughput_type), levels,
                    args.throughput_prompt_tokens, args.throughput_max_tokens),
        )
        if results is not None:
            print_table(results)
            report.throughput = {
                "model": args.throughput_model, "type": args.throughput_type,
                "prompt_tokens": args.throughput_prompt_tokens, "max_tokens": args.throughput_max_tokens,
                "levels": [level_dict(r) for r in results],
            }
    report.save()
    if args.json:
        print(f"\nwrote {args.json}")
    for error in report.errors:
        print(f"error: {error}", file=sys.stderr)
    return 1 if report.errors else 0


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        sys.exit(run(args, args.out))
    with tempfile.TemporaryDirectory(prefix="gpu-bench-smoke-") as tmp:
        sys.exit(run(args, Path(tmp)))


if __name__ == "__main__":
    main()
