"""Server processes the fault and shutdown tests drive themselves: started with extra
environment variables (``ROCMFORGE_FAULT_INJECT``, ``ROCMFORGE_SHUTDOWN_TIMEOUT``), without
waiting for readiness (the shutdown test watches the start-up), and signalled by the test.

In: the tiny GGUF, a log directory, extra ``serve`` flags and environment. Out: a
:class:`live_server.Server` (so ``stop_server`` works on it). Every wait is bounded.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import httpx
import pytest
from httpx_sse import ServerSentEvent, connect_sse
from live_server import HTTP_TIMEOUT, START_TIMEOUT_S, Server, cli_env, free_port, stop_server

T = TypeVar("T")


def spawn_server(gguf: Path, log_dir: Path, *extra: str, env: dict[str, str] | None = None,
                 device: str = "cpu") -> Server:
    """Start ``rocmforge serve`` on a free loopback port; do not wait for it."""
    port = free_port()
    args = [sys.executable, "-m", "rocmforge.cli", "serve", "--gguf", str(gguf), "--addr", f"127.0.0.1:{port}",
            "--device", device, "--dtype", "float32", "--model-name", "tiny-server", *extra]
    log_path = log_dir / f"serve-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env={**cli_env(), **(env or {})},
                                   cwd=tempfile.gettempdir())
    return Server(f"http://127.0.0.1:{port}", process, log_path)


def probe_ready(server: Server) -> int | None:
    """``GET /ready``'s status, or None when nothing listens yet."""
    try:
        return httpx.get(f"{server.url}/ready", timeout=2.0).status_code
    except httpx.TransportError:
        return None


def wait_ready(server: Server, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"server exited with {server.process.returncode} during start-up:\n{server.log()}")
        if probe_ready(server) == 200:
            return
        time.sleep(0.05)
    pytest.fail(f"server not ready within {timeout:.0f} s:\n{server.log()}")


@contextmanager
def running(server: Server) -> Iterator[Server]:
    """Wait until a spawned server is ready, hand it over, SIGTERM it at the end and check it
    exited 0 (a server that ignores SIGTERM fails the test)."""
    try:
        wait_ready(server)
        yield server
    finally:
        stop_server(server)
    assert server.process.returncode == 0, server.log()


def wait_for(predicate: Callable[[], T], timeout: float, interval: float = 0.02) -> T:
    """Poll until ``predicate()`` is truthy; return its last value (the caller asserts)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


class Background:
    """Run ``fn`` on a daemon thread; ``result(timeout)`` returns its value or re-raises."""

    def __init__(self, fn: Callable[[], T]) -> None:
        self._value: object = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], object]) -> None:
        try:
            self._value = fn()
        except BaseException as exc:  # handed to the test thread by result()
            self._error = exc

    def result(self, timeout: float) -> object:
        self._thread.join(timeout)
        if self._thread.is_alive():
            pytest.fail(f"background call still running after {timeout:.0f} s")
        if self._error is not None:
            raise self._error
        return self._value


def stream_events(url: str, body: dict, request_id: str, started: threading.Event) -> list[ServerSentEvent]:
    """Every event of a native stream; ``started`` is set on the first one."""
    events: list[ServerSentEvent] = []
    with httpx.Client(base_url=url, timeout=HTTP_TIMEOUT) as client:
        with connect_sse(client, "POST", "/generate/stream", json=body, headers={"X-Request-Id": request_id}) as src:
            for event in src.iter_sse():
                events.append(event)
                started.set()
    return events
