"""``benchmarks/soak.py --smoke``: the soak benchmark still runs, end to end, on the CPU.

Runs the script as a user would (a subprocess): it writes a tiny random-weight model, starts
``rocmforge serve`` on it, sends a few seconds of mixed traffic (valid, cancelled,
disconnected and bad requests), stops the server with SIGTERM and prints its table. The
first tests check that the run happened and covered every kind of request; the last one that
every check of the table passed (the server answered everything as documented).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "soak.py"
ROWS = (
    "duration (traffic / total)", "requests sent", "served (2xx)", "refused (429 overloaded / 503 draining)",
    "lost (accepted, never finished)", "5xx for valid requests", "4xx for valid requests",
    "bad requests not answered 4xx", "stream endings missing", "cancels confirmed / beat the cancel / sent",
    "RSS start (after 10%) / end / growth", "max /health latency", "KV usage / running / waiting at the end",
    "server exit after SIGTERM", "result",
)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    report = tmp_path_factory.mktemp("soak") / "soak.json"
    # As from a shell: the Triton interpreter switch tests/conftest.py sets is not inherited.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--json", str(report)],
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )
    # 0: every check passed; 1: a check failed (the table says which). 2 or a crash: no run.
    assert proc.returncode in (0, 1), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(report.read_text())


def test_the_table_is_printed(smoke: tuple[subprocess.CompletedProcess[str], dict[str, Any]]) -> None:
    proc, _ = smoke
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("soak: ") and "(server started here)" in lines[0], proc.stdout
    header = lines[1]
    assert header.split() == ["figure", "value", "check"], header
    value_column = header.index("value")
    for row in ROWS:
        [line] = [line for line in lines if line.startswith(row + " ")]
        assert line[value_column - 2 : value_column] == "  " and line[value_column] != " ", line  # aligned


def test_every_kind_of_request_was_sent(smoke: tuple[subprocess.CompletedProcess[str], dict[str, Any]]) -> None:
    _, report = smoke
    figures = report["figures"]
    assert set(figures["sent_by_kind"]) == {
        "generate", "generate stream", "completions", "completions stream", "chat", "chat stream", "info routes",
        "cancel", "disconnect: stream closed", "disconnect: client timeout", "bad request",
    }
    assert figures["requests_sent"] == sum(figures["sent_by_kind"].values())
    assert figures["served"] > 0 and figures["cancels_sent"] > 0 and figures["disconnects_sent"] > 0
    # The first draws are one of each bad-request variant.
    assert len(report["bad_by_variant"]) >= 25, report["bad_by_variant"]
    assert figures["samples"] >= 3 and figures["rss_start_bytes"] and figures["rss_end_bytes"]
    assert figures["server_exit_status"] == 0, figures


def test_every_check_passes(smoke: tuple[subprocess.CompletedProcess[str], dict[str, Any]]) -> None:
    proc, report = smoke
    assert report["passed"] and proc.returncode == 0, proc.stdout[-6000:]
