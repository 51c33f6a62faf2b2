"""Configuration is validated when any CLI command starts: an invalid setting is exit code 2
and one line on stderr naming the variable (or flag) and the problem, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import pytest

COMMANDS = [("models",), ("serve", "--gguf", "tiny.gguf"), ("status", "some-id"), ("inspect", "missing.gguf")]
BAD_SETTINGS = [
    ("ROCMFORGE_LOG_FORMAT", "xml", "log_format must be 'human' or 'json', got 'xml'"),
    ("ROCMFORGE_MAX_NUM_SEQS", "0", "max_num_seqs must be >= 1, got 0"),
    ("ROCMFORGE_BLOCK_SIZE", "12", "block_size must be a power of two, got 12"),
    ("ROCMFORGE_FAULT_INJECT", "oom_over:lots", "bad fault spec 'oom_over:lots'"),
    ("ROCMFORGE_LOG_LEVEL", "loud", "unknown log level 'loud'"),
    ("ROCMFORGE_MAX_BODY_BYTES", "1MB", "valid integer"),
    ("ROCMFORGE_CORS_ORIGINS", "not json", "does not parse"),
]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("ROCMFORGE_")}
    # cwd: a directory without a .env file, so only ``env`` configures the command.
    return subprocess.run([sys.executable, "-m", "rocmforge.cli", *args], capture_output=True, text=True,
                          timeout=60, env={**base, **(env or {})}, cwd=tempfile.gettempdir())


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and result.stdout == "", (result.stdout, result.stderr)
    lines = result.stderr.strip("\n").splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: invalid setting "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.mark.parametrize("variable,value,problem", BAD_SETTINGS, ids=[v for v, _, _ in BAD_SETTINGS])
def test_an_invalid_variable_stops_every_command(variable: str, value: str, problem: str) -> None:
    with ThreadPoolExecutor(len(COMMANDS)) as pool:
        results = list(pool.map(lambda args: run_cli(*args, env={variable: value}), COMMANDS))
    for command, result in zip(COMMANDS, results):
        line = assert_one_line_error(result, variable, problem)
        assert line.count(variable) == 1, (command, line)


def test_an_invalid_flag_is_named_as_the_flag() -> None:
    result = run_cli("serve", "--gguf", "tiny.gguf", "--max-num-seqs", "0")
    assert_one_line_error(result, "--max-num-seqs: ", "max_num_seqs must be >= 1, got 0")


def test_several_invalid_settings_are_reported_together() -> None:
    result = run_cli("models", env={"ROCMFORGE_LOG_FORMAT": "xml", "ROCMFORGE_MAX_WAITING": "-1"})
    line = assert_one_line_error(result, "ROCMFORGE_LOG_FORMAT: log_format must be",
                                 "ROCMFORGE_MAX_WAITING: max_waiting must be >= 1, got -1")
    assert line.count("; ") == 1, line


def test_a_rule_spanning_two_settings_names_one_of_them() -> None:
    result = run_cli("models", env={"ROCMFORGE_MAX_NUM_SEQS": "4096"})
    assert_one_line_error(result, "ROCMFORGE_MAX_NUM_BATCHED_TOKENS: ", "must be >= max_num_seqs (4096)")


def test_json_logs_make_the_error_line_json_too() -> None:
    """With a valid JSON log format, later errors are JSON records (a missing model here)."""
    import json

    result = run_cli("serve", "--gguf", "/nonexistent/model.gguf", env={"ROCMFORGE_LOG_FORMAT": "json"})
    assert result.returncode == 4, result.stderr
    [line] = result.stderr.strip().splitlines()
    record = json.loads(line)
    assert record["level"] == "ERROR" and record["logger"] == "rocmforge.cli"
    assert "not found" in record["message"]
