"""``benchmarks/gpu_bench.py --smoke``: the GPU benchmark's every code path, on the CPU.

Runs the script as a user would (a subprocess) and checks what it reports: every
(model, type) row, the HF row and every concurrency level carry positive, finite numbers in
the JSON, and the printed tables have their columns. llama.cpp's numbers are required
exactly when ``llama_cpp`` is importable (CI installs no llama-cpp-python).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_bench.py"
SPEED_KEYS = {"tg_tokens_per_s", "bytes_per_token", "roofline_tokens_per_s", "roofline_fraction"}


def _positive_numbers(where: str, numbers: dict[str, Any], keys: set[str]) -> None:
    assert keys <= set(numbers), (where, sorted(numbers))
    for key in keys:
        value = numbers[key]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (where, key, value)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    out = tmp_path_factory.mktemp("gpu-bench")
    report = out / "report.json"
    # As from a shell: the Triton interpreter switch tests/conftest.py sets is not inherited.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(out), "--json", str(report)],
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(report.read_text()), proc.stdout


def test_every_row_has_positive_finite_numbers(smoke: tuple[dict[str, Any], str]) -> None:
    report, _ = smoke
    assert report["smoke"] is True and report["errors"] == []
    assert report["copy_bandwidth_bytes_per_s"] > 0
    rows = {(r["model"], r["type"]): r for r in report["rows"]}
    assert set(rows) == {("tiny", "f16"), ("tiny", "q4_k_m")}
    for key, row in rows.items():
        assert row["file_bytes"] > 0
        _positive_numbers(f"rocmforge {key}", row["rocmforge"], SPEED_KEYS | {"pp_tokens_per_s"})
    # Weights held quantized take fewer bytes per token than the f16 file held dense.
    assert rows["tiny", "q4_k_m"]["rocmforge"]["bytes_per_token"] < rows["tiny", "f16"]["rocmforge"]["bytes_per_token"]
    [hf] = report["hf"]
    assert hf["model"] == "tiny"
    _positive_numbers("hf", hf, SPEED_KEYS)
    levels = report["throughput"]["levels"]
    assert [level["concurrency"] for level in levels] == [1, 2]
    for level in levels:
        _positive_numbers(f"concurrency {level['concurrency']}", level, {
            "requests", "output_tokens", "wall_s", "output_tokens_per_s", "ttft_p50_ms", "ttft_p99_ms",
            "itl_p50_ms", "itl_p99_ms"})
        assert level["output_tokens"] == level["requests"] * report["throughput"]["max_tokens"]


def test_llama_cpp_numbers_exactly_when_it_is_importable(smoke: tuple[dict[str, Any], str]) -> None:
    report, stdout = smoke
    # Imported in a fresh interpreter, as the script does: its CUDA build must come before numpy.
    available = subprocess.run(
        [sys.executable, "-c", "import llama_cpp"], capture_output=True, timeout=60, check=False
    ).returncode == 0
    assert (report["llama_cpp_version"] is not None) == available
    for row in report["rows"]:
        if not available:
            assert row["llama_cpp"] is None and row["tg_ratio_vs_llama_cpp"] is None
            continue
        _positive_numbers(f"llama.cpp {row['type']}", row["llama_cpp"], SPEED_KEYS | {"pp_tokens_per_s"})
        for phase in ("pp", "tg"):
            speed = f"{phase}_tokens_per_s"
            assert math.isclose(row[f"{phase}_ratio_vs_llama_cpp"], row["rocmforge"][speed] / row["llama_cpp"][speed])
    main_rows = [line for line in stdout.splitlines() if line.startswith("tiny ")]
    assert len(main_rows) == 3  # two (model, type) rows and the HF row
    for line in main_rows[:2]:  # llama.cpp's columns: measured, or n/a
        assert ("n/a" in line) == (not available), line


def test_printed_tables_have_the_columns(smoke: tuple[dict[str, Any], str]) -> None:
    _, stdout = smoke
    lines = stdout.splitlines()
    assert lines[0].startswith("command: ") and "--smoke" in lines[0]
    assert lines[1].startswith("device:  cpu")
    for header in (
        ("model", "type", "file GiB", "pp tok/s", "tg tok/s", "MiB/token", "roofline tok/s", "% roofline",
         "llama.cpp pp", "llama.cpp tg", "llama.cpp % roofline", "pp vs llama.cpp", "tg vs llama.cpp"),
        ("model", "HF tg tok/s", "MiB/token", "roofline tok/s", "% roofline"),
        ("concurrency", "requests", "out tok/s", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99"),
    ):
        [line] = [line for line in lines if line.startswith(header[0]) and all(c in line for c in header)]
        positions = [line.find(column) for column in header]
        assert -1 not in positions and positions == sorted(positions), (header, line)
