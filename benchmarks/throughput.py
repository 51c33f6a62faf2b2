"""Serving throughput and latency of the AsyncEngine at several concurrency levels.

For each level C it sends ``--requests-per-level`` requests through the AsyncEngine, at most
C in flight at a time (a new one starts as soon as one finishes), and measures on the client
side, as a server's client would see it:

* output tokens/s: all output tokens of the level / the level's wall time,
* TTFT: from calling ``submit`` to the first output carrying a token,
* inter-token latency (ITL): gaps between a request's successive tokens.

Every request generates exactly ``--max-tokens`` tokens (``ignore_eos``, greedy), and prompts
are cut to ``--prompt-tokens`` tokens, so runs are comparable across levels, devices and
commits. The prefix cache is off by default so that prompts repeated across levels are
computed again.

    python benchmarks/throughput.py --concurrency 1,8 --requests-per-level 8 --max-tokens 32
    python benchmarks/throughput.py --device cuda --concurrency 1,8,32,64 --requests-per-level 128
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from rocmforge import LLM, SamplingParams
from rocmforge.engine.async_engine import AsyncEngine
from rocmforge.hub import resolve_model
from rocmforge.settings import default_models_dir

PASSAGES = [
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type, oil-based inks and a wooden press adapted from wine making. Within fifty years, "
    "presses were running in more than two hundred European cities, and the price of books fell sharply.",
    "To make a simple tomato sauce, warm olive oil in a wide pan, add two cloves of sliced garlic and cook "
    "until fragrant. Pour in crushed tomatoes, season with salt, and simmer for twenty minutes, stirring "
    "now and then. Finish with torn basil leaves and a spoonful of butter.",
    "Photosynthesis converts light energy into chemical energy. In the chloroplasts of plant cells, "
    "chlorophyll absorbs mostly blue and red light, water molecules are split, oxygen is released, and "
    "carbon dioxide is fixed into sugars through the Calvin cycle.",
    "Dear hiring committee, I am writing to apply for the position of data analyst. Over the past four "
    "years I have built reporting pipelines, cleaned messy spreadsheets, and explained results to people "
    "who had no time for statistics but needed to make decisions quickly.",
    "def merge_sorted(a, b):\n    result = []\n    i = j = 0\n    while i < len(a) and j < len(b):\n"
    "        if a[i] <= b[j]:\n            result.append(a[i]); i += 1\n        else:\n"
    "            result.append(b[j]); j += 1\n    return result + a[i:] + b[j:]\n",
    "The hikers left the trailhead before sunrise. By noon the path had narrowed to a ledge above the river, "
    "the wind had picked up, and clouds were gathering behind the ridge. They argued briefly about turning "
    "back, then decided to push on to the shelter.",
    "Interest rates affect nearly every part of the economy. When a central bank raises its policy rate, "
    "borrowing becomes more expensive, mortgage payments rise, businesses postpone investment, and over "
    "time inflation tends to slow, although the effect arrives with long and variable lags.",
    "User: My laptop fan is always loud, even when I am only reading email. What could cause that?\n"
    "Assistant: A few common causes are dust in the vents, a background process using the CPU, an "
    "outdated BIOS, or power settings that favour performance over quiet operation.",
]


@dataclass(slots=True)
class RequestTiming:
    submitted: float
    token_times: list[float] = field(default_factory=list)
    num_tokens: int = 0


@dataclass(slots=True)
class LevelResult:
    concurrency: int
    requests: int
    output_tokens: int
    wall_s: float
    ttft_ms: list[float]
    itl_ms: list[float]

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s


def build_prompts(llm: LLM, count: int, prompt_tokens: int) -> list[list[int]]:
    """``count`` prompts of exactly ``prompt_tokens`` tokens, each starting at a different
    passage and word so no two prompts share a prefix."""
    prompts = []
    for i in range(count):
        words = " ".join(PASSAGES[(i + k) % len(PASSAGES)] for k in range(len(PASSAGES))).split(" ")
        text = " ".join(words[i // len(PASSAGES) :])
        ids = llm.tokenize(text)
        while len(ids) < prompt_tokens:
            ids = ids + ids
        prompts.append(ids[:prompt_tokens])
    return prompts


async def run_level(
    engine: AsyncEngine, prompts: list[list[int]], params: SamplingParams, concurrency: int
) -> LevelResult:
    pending = list(reversed(prompts))
    timings: list[RequestTiming] = []

    async def worker() -> None:
        while pending:
            prompt = pending.pop()
            timing = RequestTiming(time.perf_counter())
            timings.append(timing)
            stream = await engine.submit(prompt, params)
            async for output in stream:
                if output.new_token_ids:
                    timing.token_times.append(time.perf_counter())
                    timing.num_tokens += len(output.new_token_ids)
                if output.finished and output.finish_reason != "length":
                    raise RuntimeError(f"request ended with {output.finish_reason}: {output.error}")

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    ttft = [(t.token_times[0] - t.submitted) * 1e3 for t in timings if t.token_times]
    itl = [float(d) * 1e3 for t in timings for d in np.diff(t.token_times)]
    return LevelResult(concurrency, len(timings), sum(t.num_tokens for t in timings), wall, ttft, itl)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def print_table(results: list[LevelResult]) -> None:
    base = results[0].tokens_per_s if results and results[0].concurrency == 1 else None
    header = (
        f"{'concurrency':>11} {'requests':>8} {'out tok/s':>10} {'TTFT p50':>9} {'TTFT p99':>9} "
        f"{'ITL p50':>8} {'ITL p99':>8} {'speedup':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        speedup = f"{r.tokens_per_s / base:7.2f}x" if base else "     n/a"
        print(
            f"{r.concurrency:>11} {r.requests:>8} {r.tokens_per_s:>10.1f} {pct(r.ttft_ms, 50):>9.1f} "
            f"{pct(r.ttft_ms, 99):>9.1f} {pct(r.itl_ms, 50):>8.1f} {pct(r.itl_ms, 99):>8.1f} {speedup}"
        )
    print("(TTFT and ITL in ms; speedup: output tok/s relative to concurrency 1)")


async def main_async(args: argparse.Namespace, llm: LLM) -> list[LevelResult]:
    levels = [(int(c), args.requests_per_level) for c in args.concurrency.split(",")]
    return await measure_levels(llm, levels, args.prompt_tokens, args.max_tokens)


async def measure_levels(
    llm: LLM, levels: list[tuple[int, int]], prompt_tokens: int, max_tokens: int
) -> list[LevelResult]:
    """Run each (concurrency, number of requests) level through one AsyncEngine over ``llm``,
    after a short warm-up; prints one line per level as it finishes."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    engine = AsyncEngine.from_llm(llm)
    engine.start()
    results = []
    try:
        warmup = build_prompts(llm, 2, min(prompt_tokens, 16))
        await run_level(engine, warmup, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), 2)
        for level, requests in levels:
            prompts = build_prompts(llm, requests, prompt_tokens)
            result = await run_level(engine, prompts, params, level)
            print(
                f"concurrency {level:>3}: {result.requests} requests, {result.output_tokens} tokens "
                f"in {result.wall_s:.2f} s",
                flush=True,
            )
            results.append(result)
    finally:
        await engine.shutdown(timeout=5.0)
    return results


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", default=None, help="GGUF path or known model name (default: the default model)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16 (auto: per device)")
    parser.add_argument("--weight-format", default="auto", choices=["auto", "dense", "quantized"],
                        help="auto (the default settings): the quantized path on either device")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated levels")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--requests-per-level", type=int, default=32)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--prefix-caching", action="store_true", help="keep the prefix cache on")
    parser.add_argument("--log-level", default="WARNING")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    path = resolve_model(args.gguf, default_models_dir())
    max_level = max(int(c) for c in args.concurrency.split(","))
    llm = LLM(
        path,
        device=args.device,
        dtype=args.dtype,
        weight_format=args.weight_format,
        max_num_seqs=max(args.max_num_seqs, max_level),
        enable_prefix_caching=args.prefix_caching,
    )
    device = str(llm.device)
    if llm.device.type == "cuda":
        device += f" ({torch.cuda.get_device_name(llm.device)})"
    print(f"model:   {path.name}")
    print(f"device:  {device}, dtype {llm.dtype}, weights {args.weight_format}, torch {torch.__version__}")
    print(f"host:    {platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
    print(
        f"load:    {args.requests_per_level} requests per level, prompt {args.prompt_tokens} tokens, "
        f"{args.max_tokens} output tokens each (greedy, ignore_eos), prefix cache "
        f"{'on' if args.prefix_caching else 'off'}"
    )
    results = asyncio.run(main_async(args, llm))
    print()
    print_table(results)


if __name__ == "__main__":
    main()
