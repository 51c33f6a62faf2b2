"""What a structured-output constraint costs in decode speed, against llama.cpp's grammars.

Each engine runs in a fresh process of its own on the same file, the same prompt ids and the
same thread count, greedy, with and without a constraint:

* ``none``: unconstrained (``ignore_eos``), the baseline;
* ``json``: a JSON schema whose output cannot end within the token budget (an array of at
  least 100 small objects with a bounded string, an integer range and an enum), so every row
  stays constrained, and masks stay non-trivial, for the whole run;
* ``regex`` (rocmforge only: llama.cpp takes no regex): ``([a-z]+ ){200,}``, word by word.

Decode tok/s is ``(tokens - 1) / (last token time - first token time)`` of one request at
batch 1, and the same over all tokens of the batch at batch 8 (rocmforge only; llama.cpp's
Python binding decodes one sequence). "vs none" is the constrained speed over the
unconstrained speed of the same engine at the same batch; "vs llama.cpp" compares the two
engines at batch 1 under the same constraint. llama.cpp compiles the schema to GBNF
(``LlamaGrammar.from_json_schema``); rocmforge to llguidance.

    python benchmarks/structured.py --llama-python /path/to/venv-with-llama_cpp/bin/python
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from worker_process import run_json_worker

SCHEMA = {
    "type": "object",
    "properties": {
        "people": {
            "type": "array",
            "minItems": 100,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 12},
                    "age": {"type": "integer", "minimum": 0, "maximum": 120},
                    "role": {"enum": ["engineer", "teacher", "doctor", "artist", "farmer"]},
                },
                "required": ["name", "age", "role"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["people"],
    "additionalProperties": False,
}
REGEX = "([a-z]+ ){200,}"
PROMPT = "List one hundred people, with their name, age and job, as JSON."


def _decode_speed(stamps: list[float], tokens: int) -> float:
    return (tokens - 1) / (stamps[-1] - stamps[0])


def worker_rocmforge(path: str, ids: list[int], threads: int, tokens: int, runs: int) -> dict[str, float]:
    from rocmforge import LLM, SamplingParams
    from rocmforge.structured import StructuredOutput

    llm = LLM(path, device="cpu", threads=threads, enable_prefix_caching=False, max_model_len=len(ids) + tokens + 8)
    specs = {"none": None, "json": StructuredOutput(json=SCHEMA), "regex": StructuredOutput(regex=REGEX)}
    results = {}
    for name, spec in specs.items():
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True, structured=spec)
        llm.generate(ids, SamplingParams(max_tokens=4, temperature=0.0, structured=spec))  # warm-up, compile
        for batch in (1, 8):
            speeds = []
            for _ in range(runs):
                speeds.append(_batch_speed(llm, ids, params, batch))
            results[f"{name}/{batch}"] = statistics.median(speeds)
    return results


def _batch_speed(llm, ids: list[int], params, batch: int) -> float:
    """Output tok/s of ``batch`` requests decoding together (from the step that gave every
    request its first token to the last step)."""
    engine = llm.engine
    for i in range(batch):
        engine.add_request(f"bench-{i}", ids[: len(ids) - i], params)  # distinct prompts
    produced, first = 0, None
    while engine.has_unfinished():
        outputs = engine.step()
        if first is None:
            if sum(1 for o in outputs if o.new_token_ids) == batch:
                first = time.perf_counter()
            continue
        produced += sum(len(o.new_token_ids) for o in outputs)
        for output in outputs:
            if output.finished and output.finish_reason != "length":
                raise RuntimeError(f"request ended early: {output.finish_reason} {output.error}")
    return produced / (time.perf_counter() - first)


def worker_llamacpp(path: str, ids: list[int], threads: int, tokens: int, runs: int) -> dict[str, float]:
    from llama_cpp import Llama, LlamaGrammar

    llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=len(ids) + tokens + 8,
                verbose=False)
    grammars = {"none": None, "json": LlamaGrammar.from_json_schema(json.dumps(SCHEMA), verbose=False)}
    results = {}
    for name, grammar in grammars.items():
        speeds = []
        for _ in range(runs):
            llm.reset()
            stamps = []
            for _chunk in llm.create_completion(ids, max_tokens=tokens, temperature=0.0, grammar=grammar,
                                                stream=True):
                stamps.append(time.perf_counter())
            if len(stamps) < tokens // 2:
                raise RuntimeError(f"llama.cpp stopped after {len(stamps)} chunks")
            speeds.append(_decode_speed(stamps, len(stamps)))
        results[f"{name}/1"] = statistics.median(speeds)
    return results


def prompt_ids(path: Path) -> list[int]:
    from rocmforge.gguf import read_gguf
    from rocmforge.tokenizer import Tokenizer

    with read_gguf(path) as gguf:
        tokenizer = Tokenizer.from_gguf_metadata(gguf.metadata)
    return tokenizer.encode_chat([{"role": "user", "content": PROMPT}]).ids


def run_worker(python: str, engine: str, path: Path, ids: list[int], args: argparse.Namespace) -> dict | None:
    command = [python, __file__, "--worker", engine, "--gguf", str(path), "--ids", json.dumps(ids),
               "--threads", str(args.threads), "--tokens", str(args.tokens), "--runs", str(args.runs)]
    return run_json_worker(command, engine)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", default=None, help="GGUF file (default: the default model)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128, help="output tokens per request")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--llama-python", default=sys.executable, help="interpreter with llama_cpp installed")
    parser.add_argument("--worker", choices=("rocmforge", "llamacpp"), help=argparse.SUPPRESS)
    parser.add_argument("--ids", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        worker = worker_rocmforge if args.worker == "rocmforge" else worker_llamacpp
        print(json.dumps(worker(args.gguf, json.loads(args.ids), args.threads, args.tokens, args.runs)))
        return

    if args.gguf:
        path = Path(args.gguf)
    else:
        from rocmforge.hub import resolve_model
        from rocmforge.settings import default_models_dir

        path = Path(resolve_model(None, default_models_dir()))
    ids = prompt_ids(path)
    ours = run_worker(sys.executable, "rocmforge", path, ids, args)
    theirs = run_worker(args.llama_python, "llamacpp", path, ids, args)

    print(f"model: {path.name}; threads {args.threads}; prompt {len(ids)} tokens, {args.tokens} output tokens "
          f"per request, greedy; median of {args.runs} runs; each engine in its own process")
    print(f"{'engine':<11}{'constraint':<12}{'batch':>6}{'decode tok/s':>14}{'vs none':>9}{'vs llama.cpp':>14}")
    for engine, result in (("rocmforge", ours), ("llama.cpp", theirs)):
        if result is None:
            print(f"{engine:<11}failed")
            continue
        for key, speed in result.items():
            name, batch = key.split("/")
            versus_none = speed / result[f"none/{batch}"]
            other = theirs if engine == "rocmforge" else None
            versus = f"{speed / other[key]:>13.2f}x" if other and key in other else f"{'':>14}"
            print(f"{engine:<11}{name:<12}{batch:>6}{speed:>14.1f}{versus_none:>8.2f}x{versus}")


if __name__ == "__main__":
    main()
