"""How close the CPU paths are to each other, on many more positions than the references in
``../shared/reference/`` hold: teacher-forced top-1 agreement and perplexity of rocmforge's
default (``auto``: the native kernels, 8-bit activations) and ``dense`` (fp32, the HF
oracle's numbers: tests/models/test_hf_parity.py) paths and of llama.cpp
(llama-cpp-python, same file, same token ids), over chunks of this repository's docs.

At the references' 122 positions one top-1 flip moves agreement by 0.8 points; here
``--chunks`` x ``--context`` positions (2040 by default) make the rates worth comparing.

    python benchmarks/cpu_accuracy.py [--gguf F] [--chunks 8] [--context 256] --llama-python P
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from worker_process import run_json_worker

DOCS = Path(__file__).resolve().parents[1] / "docs"


def token_chunks(path: str, chunks: int, context: int) -> list[list[int]]:
    """``chunks`` runs of ``context`` token ids of the docs, tokenized by the model's own tokenizer."""
    from rocmforge.gguf import read_gguf
    from rocmforge.tokenizer import Tokenizer

    text = "\n\n".join(p.read_text() for p in sorted(DOCS.glob("*.md")))
    gguf = read_gguf(path)
    try:
        ids = Tokenizer.from_gguf_metadata(gguf.metadata).encode(text)
    finally:
        gguf.close()
    if len(ids) < chunks * context:
        sys.exit(f"the docs give {len(ids)} tokens, fewer than {chunks} x {context}")
    return [ids[i * context : (i + 1) * context] for i in range(chunks)]


def worker_rocmforge(path: str, weight_format: str, chunks: list[list[int]]) -> dict[str, list[list[float]]]:
    from rocmforge import LLM

    llm = LLM(path, device="cpu", weight_format=weight_format)
    top1, logprobs = [], []
    for ids in chunks:
        entries = llm.prompt_logprobs(ids, top_k=1)
        top1.append([e.top[0][0] for e in entries])
        logprobs.append([e.logprob for e in entries])
    return {"top1": top1, "logprobs": logprobs}


def worker_llamacpp(path: str, chunks: list[list[int]]) -> dict[str, list[list[float]]]:
    from llama_cpp import Llama

    context = len(chunks[0])
    llm = Llama(model_path=path, n_threads=2, n_ctx=context + 8, n_batch=context, logits_all=True, verbose=False)
    top1, logprobs = [], []
    for ids in chunks:
        llm.reset()
        llm.eval(ids)
        scores = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float64)
        shifted = scores - scores.max(axis=1, keepdims=True)
        log_softmax = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        top1.append(scores.argmax(axis=1).tolist())
        logprobs.append([float(log_softmax[i, ids[i + 1]]) for i in range(len(ids) - 1)])
    return {"top1": top1, "logprobs": logprobs}


def _agreement(a: list[list[float]], b: list[list[float]]) -> tuple[int, int]:
    pairs = [(x, y) for row_a, row_b in zip(a, b, strict=True) for x, y in zip(row_a, row_b, strict=True)]
    return sum(x == y for x, y in pairs), len(pairs)


def _perplexity(logprobs: list[list[float]]) -> float:
    flat = [v for row in logprobs for v in row]
    return math.exp(-sum(flat) / len(flat))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", help="model file (default: the default model)")
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--llama-python", default=sys.executable, help="interpreter with llama_cpp installed")
    parser.add_argument("--worker", choices=("auto", "dense", "llamacpp"), help=argparse.SUPPRESS)
    parser.add_argument("--ids", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        chunks = json.loads(Path(args.ids).read_text())
        if args.worker == "llamacpp":
            result = worker_llamacpp(args.gguf, chunks)
        else:
            result = worker_rocmforge(args.gguf, args.worker, chunks)
        print(json.dumps(result))
        return

    if args.gguf is None:
        from rocmforge.hub import resolve_model
        from rocmforge.settings import default_models_dir

        args.gguf = str(resolve_model(None, default_models_dir()))
    chunks = token_chunks(args.gguf, args.chunks, args.context)
    ids_file = Path(args.gguf).with_suffix(".accuracy-ids.json")
    ids_file.write_text(json.dumps(chunks))
    results = {}
    for engine, python in (("auto", sys.executable), ("dense", sys.executable), ("llamacpp", args.llama_python)):
        command = [python, __file__, "--worker", engine, "--gguf", args.gguf, "--ids", str(ids_file)]
        result = run_json_worker(command, engine)
        if result is None:
            sys.exit(1)
        results[engine] = result
    ids_file.unlink()

    oracle = results["dense"]
    print(f"{Path(args.gguf).name}: {args.chunks} chunks of {args.context} tokens of docs/, teacher-forced")
    print(f"{'path':<22}{'top-1 = llama.cpp':>20}{'top-1 = fp32 oracle':>22}{'perplexity':>12}{'ppl / oracle':>14}")
    for name, engine in (("rocmforge auto", "auto"), ("rocmforge dense (fp32)", "dense"), ("llama.cpp", "llamacpp")):
        same_lcp, total = _agreement(results[engine]["top1"], results["llamacpp"]["top1"])
        same_oracle, _ = _agreement(results[engine]["top1"], oracle["top1"])
        ppl = _perplexity(results[engine]["logprobs"])
        print(f"{name:<22}{f'{same_lcp}/{total} = {same_lcp / total:.1%}':>20}"
              f"{f'{same_oracle}/{total} = {same_oracle / total:.1%}':>22}{ppl:>12.4f}"
              f"{ppl / _perplexity(oracle['logprobs']):>14.4f}")


if __name__ == "__main__":
    main()
