"""``benchmarks/profile_step.py`` on the CPU: it runs, profiles the decode steps it says, and
prints the operator table a slow row is explained with."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from rocmforge.synthetic import SyntheticSpec, random_hf_weights, write_gguf

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "profile_step.py"


def test_profile_of_decode_steps(tmp_path: Path) -> None:
    spec = SyntheticSpec(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                         vocab_size=320, max_context=256, tie_embeddings=False)
    path = tmp_path / "tiny.gguf"
    write_gguf(path, spec, random_hf_weights(spec))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--gguf", str(path), "--device", "cpu", "--batch", "3", "--context", "20",
         "--steps", "4", "--trace", str(tmp_path / "trace.json")],
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "batch 3, context 20" in out and "Self CPU" in out, out

    def calls(op: str) -> int:
        found = re.search(rf"{re.escape(op)}\s.*?(\d+)\s*$", out, re.MULTILINE)
        assert found is not None, f"{op} not in\n{out}"
        return int(found.group(1))

    # Each profiled step (and no more steps than asked for) ran every layer and the head once:
    # with the native kernels a decode step's layer is one decoder_layer call and the head one
    # matmul; on torch's kernels, 2 layers x 4 linears + the head = 9 matmuls per step.
    from rocmforge import native

    if native.available():
        assert calls("rocmforge_cpu::decoder_layer") == 4 * 2 and calls("rocmforge_cpu::matmul") == 4 * 1, out
    else:
        assert calls("aten::mm") == 4 * 9, out
    step = re.search(r"4 decode steps: ([0-9.]+) ms/step, ([0-9.]+) output tok/s", out)
    assert step is not None and float(step.group(1)) > 0 and float(step.group(2)) > 0, out
    assert (tmp_path / "trace.json").stat().st_size > 0
