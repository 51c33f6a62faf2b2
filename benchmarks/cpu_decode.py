"""Prompt-processing and decode speed, peak RSS and load time on the CPU, against llama.cpp.

For each model — the default model and random-weight Llama-3.2-1B-shaped files (Q4_0, Q8_0,
Q4_K_M, written by :func:`rocmforge.synthetic.write_random_gguf`), plus an 8B-shaped Q4_K_M
with ``--big`` — rocmforge (default settings, i.e. ``weight_format=auto``) and llama.cpp
(llama-cpp-python) run the same token ids on the same file with the same thread count, each
in a fresh process of its own, so that peak RSS and load time are per engine:

* prompt tok/s: one 256-token prompt (``--prompt-tokens``), to its first sampled token;
* decode tok/s: 128 tokens (``--gen-tokens``) after an 8-token prompt, first token excluded;
* peak RSS: the process's high-water mark (file pages of the mapped model included, as for
  llama.cpp); load: constructing the engine, model file to ready.

Each figure is the median of ``--runs``. Ratio columns are rocmforge / llama.cpp.
``--llama-python`` names an interpreter with llama_cpp installed (default: this one).

    python benchmarks/cpu_decode.py [--models default,1b-q4_0,1b-q8_0,1b-q4_k_m] [--big] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from worker_process import run_json_worker

MODELS = ("default", "1b-q4_0", "1b-q8_0", "1b-q4_k_m")


def prompt_ids(vocab: int, n: int) -> list[int]:
    """Deterministic ids inside any vocabulary (no tokenizer: both engines see the same ids)."""
    return [(17 * j + 11) % (vocab - 300) + 256 for j in range(n)]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def model_file(name: str, out: Path) -> Path:
    """The GGUF file behind a model name, written first for the random-weight ones."""
    if name == "default":
        from rocmforge.hub import resolve_model
        from rocmforge.settings import default_models_dir

        return Path(resolve_model(None, default_models_dir()))
    from gguf import GGMLQuantizationType

    from rocmforge.synthetic import LLAMA_3_1_8B, LLAMA_3_2_1B, q4_k_m_types, write_random_gguf

    shape, kind = name.split("-", 1)
    spec = {"1b": LLAMA_3_2_1B, "8b": LLAMA_3_1_8B}[shape]
    path = out / f"rocmforge-bench-{name}.gguf"
    if not path.exists():
        chooser = q4_k_m_types(spec) if kind == "q4_k_m" else GGMLQuantizationType[kind.upper()]
        print(f"writing {path} ...", file=sys.stderr)
        out.mkdir(parents=True, exist_ok=True)
        write_random_gguf(path, spec, chooser)
    return path


def worker_rocmforge(path: str, threads: int, pp: int, tg: int, runs: int) -> dict[str, float]:
    from rocmforge import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(path, device="cpu", threads=threads, enable_prefix_caching=False, max_model_len=pp + 64)
    load = time.perf_counter() - start
    ids = prompt_ids(llm.config.vocab_size, pp)
    llm.generate(ids[:16], SamplingParams(max_tokens=4, temperature=0.0))  # warm-up
    pp_speeds, tg_speeds = [], []
    for _ in range(runs):
        start = time.perf_counter()
        llm.generate(ids, SamplingParams(max_tokens=1, temperature=0.0))
        pp_speeds.append(pp / (time.perf_counter() - start))
        stamps = [time.perf_counter() for _ in llm.stream(ids[:8], SamplingParams(max_tokens=tg, temperature=0.0,
                                                                                  ignore_eos=True))]
        tg_speeds.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return {"load_s": load, "pp": statistics.median(pp_speeds), "tg": statistics.median(tg_speeds),
            "rss_mib": peak_rss_mib(), "weight_format": llm.engine_config.load.weight_format}


def worker_llamacpp(path: str, threads: int, pp: int, tg: int, runs: int) -> dict[str, float]:
    from llama_cpp import Llama

    start = time.perf_counter()
    llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=pp + 64, n_batch=512,
                verbose=False)
    load = time.perf_counter() - start
    ids = prompt_ids(llm.n_vocab(), pp)
    llm.eval(ids[:16])  # warm-up
    pp_speeds, tg_speeds = [], []
    for _ in range(runs):
        llm.reset()
        start = time.perf_counter()
        llm.eval(ids)
        pp_speeds.append(pp / (time.perf_counter() - start))
        llm.reset()
        llm.eval(ids[:8])
        start = time.perf_counter()
        for _ in range(tg - 1):
            llm.eval([llm.sample(temp=0.0)])
        tg_speeds.append((tg - 1) / (time.perf_counter() - start))
    return {"load_s": load, "pp": statistics.median(pp_speeds), "tg": statistics.median(tg_speeds),
            "rss_mib": peak_rss_mib()}


def run_worker(python: str, engine: str, path: Path, args: argparse.Namespace) -> dict[str, float] | None:
    command = [python, __file__, "--worker", engine, "--gguf", str(path), "--threads", str(args.threads),
               "--prompt-tokens", str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens),
               "--runs", str(args.runs)]
    return run_json_worker(command, f"{engine} on {path.name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of: {', '.join(MODELS)}")
    parser.add_argument("--gguf", help="a GGUF file to measure instead of --models")
    parser.add_argument("--big", action="store_true", help="add the 8B-shaped Q4_K_M row (writes 4.6 GB)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", default=tempfile.gettempdir(), help="where the random-weight files are written")
    parser.add_argument("--llama-python", default=sys.executable, help="interpreter with llama_cpp installed")
    parser.add_argument("--worker", choices=("rocmforge", "llamacpp"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        worker = worker_rocmforge if args.worker == "rocmforge" else worker_llamacpp
        print(json.dumps(worker(args.gguf, args.threads, args.prompt_tokens, args.gen_tokens, args.runs)))
        return

    names = [args.gguf] if args.gguf else args.models.split(",") + (["8b-q4_k_m"] if args.big else [])
    rows = []
    for name in names:
        path = Path(name) if args.gguf else model_file(name, Path(args.out))
        ours = run_worker(sys.executable, "rocmforge", path, args)
        theirs = run_worker(args.llama_python, "llamacpp", path, args)
        rows.append((Path(name).name, path.stat().st_size / 2**20, ours, theirs))

    print(f"threads: {args.threads}; prompt {args.prompt_tokens} tokens, decode {args.gen_tokens} tokens; "
          f"median of {args.runs} runs; each engine in its own process")
    columns = ("model", "file MiB", "engine", "load s", "prompt tok/s", "decode tok/s", "peak RSS MiB")
    print(f"{columns[0]:<14}{columns[1]:>9}  {columns[2]:<11}{columns[3]:>8}{columns[4]:>14}{columns[5]:>14}"
          f"{columns[6]:>14}")
    for name, size, ours, theirs in rows:
        for engine, result in (("rocmforge", ours), ("llama.cpp", theirs)):
            if result is None:
                print(f"{name:<14}{size:>9.0f}  {engine:<11}{'failed':>8}")
                continue
            print(f"{name:<14}{size:>9.0f}  {engine:<11}{result['load_s']:>8.2f}{result['pp']:>14.1f}"
                  f"{result['tg']:>14.1f}{result['rss_mib']:>14.0f}")
        if ours and theirs:
            print(f"{name:<14}{'':>9}  {'ratio':<11}{ours['load_s'] / theirs['load_s']:>7.2f}x"
                  f"{ours['pp'] / theirs['pp']:>13.2f}x{ours['tg'] / theirs['tg']:>13.2f}x"
                  f"{ours['rss_mib'] / theirs['rss_mib']:>13.2f}x")


if __name__ == "__main__":
    main()
