"""Where one engine step's time goes: a torch.profiler table of decode (and prefill) steps.

For a row of ``gpu_bench.py`` that falls short, this says why: the kernels that take the
device time (attention, quantized matmuls, fused ops, sampler), how many launches a step
makes, and how much of the step is host time the device waits through.

In: a GGUF file (or ``--random 1b|8b --type q4_k_m`` to write a random-weight one with
:func:`rocmforge.synthetic.write_random_gguf`), a batch size and a context length. Out: the
profiler's table sorted by device time (CPU time on the CPU), and the wall time per step.
``--eager`` turns CUDA graphs off, so every kernel of the step shows by name (a replayed
graph shows as one launch).

    python benchmarks/profile_step.py --random 8b --type q4_k_m --batch 1 --eager
    python benchmarks/profile_step.py --gguf model.gguf --batch 32 --steps 20 --trace /tmp/trace.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from gguf import GGMLQuantizationType
from torch.profiler import ProfilerActivity, profile

from rocmforge import LLM, SamplingParams
from rocmforge.synthetic import LLAMA_3_1_8B, LLAMA_3_2_1B, q4_k_m_types, write_random_gguf

PRESETS = {"1b": LLAMA_3_2_1B, "8b": LLAMA_3_1_8B}


def model_path(args: argparse.Namespace) -> Path:
    if args.gguf:
        return Path(args.gguf)
    path = Path(args.out) / f"{args.random}-{args.type}.gguf"
    if not path.exists():
        spec = PRESETS[args.random]
        chooser = q4_k_m_types(spec) if args.type == "q4_k_m" else GGMLQuantizationType[args.type.upper()]
        write_random_gguf(path, spec, chooser)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--gguf", help="GGUF file to profile")
    source.add_argument("--random", choices=sorted(PRESETS), help="write a random-weight file of this shape")
    parser.add_argument("--type", default="q4_k_m", help="tensor type of --random: q4_k_m, f16, q8_0, q4_0, ...")
    parser.add_argument("--out", default=tempfile.gettempdir(), help="where --random writes its file")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", type=int, default=1, help="requests decoded together")
    parser.add_argument("--context", type=int, default=512, help="prompt tokens per request")
    parser.add_argument("--steps", type=int, default=10, help="decode steps profiled")
    parser.add_argument("--eager", action="store_true", help="no CUDA graphs: every kernel by name")
    parser.add_argument("--rows", type=int, default=25, help="rows of the table")
    parser.add_argument("--trace", help="also write a Chrome trace here")
    args = parser.parse_args()

    llm = LLM(model_path(args), device=args.device, max_num_seqs=max(args.batch, 1),
              max_model_len=args.context + args.steps + 8, cuda_graphs=not args.eager, enable_prefix_caching=False)
    engine = llm.engine
    vocab = llm.config.vocab_size
    params = SamplingParams(max_tokens=args.steps + 2, temperature=0.0, ignore_eos=True)
    for i in range(args.batch):
        prompt = [(17 * i + 31 * j) % (vocab - 1) + 1 for j in range(args.context)]
        engine.add_request(f"profile-{i}", prompt, params)
    while engine.scheduler.waiting or any(r.num_output_tokens == 0 for r in engine.scheduler.running):
        engine.step()  # prefill, outside the profile
    engine.step()  # one decode step: compiled kernels and allocations warm

    cuda = llm.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        if cuda:
            torch.cuda.synchronize(llm.device)
        elapsed = time.perf_counter() - start
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(f"{llm.path.name} on {llm.device} ({llm.dtype}), batch {args.batch}, context {args.context}, "
          f"CUDA graphs {'off' if args.eager or not cuda else 'on'}")
    print(prof.key_averages().table(sort_by=sort, row_limit=args.rows))
    print(f"{args.steps} decode steps: {elapsed / args.steps * 1e3:.2f} ms/step, "
          f"{args.batch * args.steps / elapsed:.1f} output tok/s")
    if args.trace:
        prof.export_chrome_trace(args.trace)
        print(f"trace: {args.trace}")


if __name__ == "__main__":
    main()
