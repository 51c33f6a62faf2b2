"""The native CPU matmul strategies, side by side: GFLOP/s of the integer kernels (``matmul``,
on every instruction set this CPU has) and of dequantized tiles through ATen's GEMM
(``matmul_dequant``), per ggml type, at the matmul shapes of a Llama-3.2-1B layer.

This is what ``native.INTEGER_GEMM_TYPES`` and ``NATIVE_DENSE_MIN_ROWS`` are read from: a
type joins the integer set where its ``matmul`` beats ``matmul_dequant`` at prompt row
counts. Each figure is the best of ``--reps`` calls, the strategies interleaved call by call
so that a slow spell of a shared machine hits all of them alike.

    python benchmarks/cpu_matmul.py [--rows 1,8,256] [--types q4_k,q6_k,q4_0] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from gguf import GGMLQuantizationType

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.gguf_blocks

from tests.gguf_blocks import random_weight

from rocmforge import native
from rocmforge.quant.gguf_linear import NATIVE_TILE_BYTES

SHAPES = [(3072, 2048, "qkv"), (16384, 2048, "gate|up"), (2048, 8192, "down")]
"""(out_features, in_features, name) of the 1B shape's matmuls."""


def _best(calls: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    for call in calls.values():
        call()  # warm-up
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(reps):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,8,256", help="activation rows (tokens) per call")
    parser.add_argument("--types", default="q4_k,q5_k,q6_k,q4_0,q4_1,q8_0")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=6)
    args = parser.parse_args()

    ops = native.ops()
    if ops is None:
        sys.exit(f"native kernels unavailable: {native.unavailable_reason()}")
    torch.set_num_threads(args.threads)
    isas = [i for i in ops.available_isas() if i > 0]
    names = [native.ISA_NAMES[i] for i in isas]
    print(f"threads: {args.threads}; best isa: {ops.isa_name(-1)}; GFLOP/s, best of {args.reps}")
    print(f"{'type':6} {'shape':8} {'rows':>5} " + " ".join(f"{n:>12}" for n in names) + f" {'dequant+GEMM':>13}")
    for type_name in args.types.split(","):
        qtype = GGMLQuantizationType[type_name.upper()]
        for n, k, shape in SHAPES:
            weight = random_weight(qtype, n, k, seed=0)
            for m in (int(r) for r in args.rows.split(",")):
                x = torch.randn(m, k)
                out = torch.empty(m, n)
                tile = max(1, NATIVE_TILE_BYTES // (4 * k))
                calls: dict[str, Callable[[], object]] = {
                    name: partial(ops.matmul, x, [weight], [int(qtype)], out, isa)
                    for isa, name in zip(isas, names, strict=True)
                }
                calls["dequant"] = partial(ops.matmul_dequant, x, [weight], [int(qtype)], out, tile)
                best = _best(calls, args.reps)
                gflop = 2 * m * n * k / 1e9
                cells = " ".join(f"{gflop / best[name]:12.0f}" for name in names)
                print(f"{qtype.name:6} {shape:8} {m:5} {cells} {gflop / best['dequant']:13.0f}", flush=True)


if __name__ == "__main__":
    main()
