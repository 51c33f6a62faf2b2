"""Prompt-processing and decode speed of one request on the CPU, against llama.cpp.

Runs the default model (or --gguf) with a 256-token prompt and 128 generated tokens on
--threads threads, for each --weight-format, and prints tokens/s and peak RSS. When
llama-cpp-python is importable, llama.cpp runs the same file with the same prompt in the
same process and the table shows rocmforge / llama.cpp ratios.

    python benchmarks/cpu_decode.py [--gguf FILE] [--threads 2] [--formats dense,quantized]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from rocmforge import LLM, SamplingParams
from rocmforge.hub import resolve_model
from rocmforge.settings import default_models_dir

PROMPT_TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, "
    "it was the season of Darkness, it was the spring of hope, it was the winter of despair. "
)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prompt_ids(llm: LLM, n: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < n:
        ids += llm.tokenize(PROMPT_TEXT)
    return ids[:n]


def bench_rocmforge(path: str, weight_format: str, pp: int, tg: int, runs: int) -> tuple[float, float]:
    llm = LLM(path, device="cpu", weight_format=weight_format, enable_prefix_caching=False)
    ids = prompt_ids(llm, pp)
    llm.generate(ids[:16], SamplingParams(max_tokens=4, temperature=0.0))  # warm-up
    pp_speeds, tg_speeds = [], []
    for _ in range(runs):
        start = time.perf_counter()
        llm.generate(ids, SamplingParams(max_tokens=1, temperature=0.0))
        pp_speeds.append(pp / (time.perf_counter() - start))
        # Decode speed: time per generated token after the first (prefill excluded).
        stamps = []
        for _ in llm.stream(ids[:8], SamplingParams(max_tokens=tg, temperature=0.0, ignore_eos=True)):
            stamps.append(time.perf_counter())
        tg_speeds.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return statistics.median(pp_speeds), statistics.median(tg_speeds)


def bench_llamacpp(path: str, threads: int, pp: int, tg: int, runs: int, ids: list[int]) -> tuple[float, float] | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=1024, n_batch=512, verbose=False)
    pp_speeds, tg_speeds = [], []
    for _ in range(runs):
        llm.reset()
        start = time.perf_counter()
        llm.eval(ids)
        pp_speeds.append(pp / (time.perf_counter() - start))
        llm.reset()
        llm.eval(ids[:8])
        start = time.perf_counter()
        for _ in range(tg):
            token = llm.sample(temp=0.0)
            llm.eval([token])
        tg_speeds.append(tg / (time.perf_counter() - start))
    return statistics.median(pp_speeds), statistics.median(tg_speeds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", default=None, help="GGUF file (default: the default model)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--formats", default="dense,quantized")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = str(resolve_model(args.gguf, default_models_dir()))

    rows = []
    for weight_format in args.formats.split(","):
        pp, tg = bench_rocmforge(path, weight_format, args.prompt_tokens, args.gen_tokens, args.runs)
        rows.append((f"rocmforge {weight_format}", pp, tg, peak_rss_mib()))
    reference_ids = prompt_ids(LLM(path, device="cpu", weight_format="dense"), args.prompt_tokens)
    llama = bench_llamacpp(path, args.threads, args.prompt_tokens, args.gen_tokens, args.runs, reference_ids)

    print(f"model: {path}\nthreads: {args.threads}, prompt {args.prompt_tokens} tokens, decode {args.gen_tokens} tokens, "
          f"median of {args.runs} runs (peak RSS is cumulative for the process)")
    header = f"{'engine':<24}{'prompt tok/s':>14}{'decode tok/s':>14}{'peak RSS MiB':>14}"
    if llama:
        header += f"{'pp vs llama.cpp':>17}{'tg vs llama.cpp':>17}"
    print(header)
    for name, pp, tg, rss in rows:
        line = f"{name:<24}{pp:>14.1f}{tg:>14.1f}{rss:>14.0f}"
        if llama:
            line += f"{pp / llama[0]:>16.2f}x{tg / llama[1]:>16.2f}x"
        print(line)
    if llama:
        print(f"{'llama.cpp':<24}{llama[0]:>14.1f}{llama[1]:>14.1f}")
    else:
        print("llama.cpp: not measured (pip install llama-cpp-python to compare in the same run)")


if __name__ == "__main__":
    main()
