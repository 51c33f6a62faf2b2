"""Running one engine's measurement in a process of its own (so that peak RSS, load time and
threads are that engine's alone), for the side-by-side benchmarks: the worker prints its
result as JSON on its last stdout line."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any


def run_json_worker(command: list[str], label: str) -> dict[str, Any] | None:
    """The JSON result of ``command``, or None (its stderr tail reported) when it fails."""
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"{label} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])
