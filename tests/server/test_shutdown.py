"""Graceful shutdown of a real ``rocmforge serve`` process.

``/ready`` answers 503 (or nothing listens yet) while loading, 200 while serving and 503
"draining" once SIGTERM arrived; requests in flight at the signal that end within
``ROCMFORGE_SHUTDOWN_TIMEOUT`` end normally, longer ones end with a clear cancellation; new
requests are refused with 503 ``server_draining``; the process exits 0 within the timeout
plus a small margin. A second signal cancels everything at once.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from live_server import HTTP_TIMEOUT, LONG_MAX_TOKENS, STOP_TIMEOUT_S, Server, assert_error_shape, stop_server
from spawned_server import Background, probe_ready, spawn_server, stream_events, wait_for, wait_ready

SHUTDOWN_TIMEOUT_S = 2.0
EXIT_MARGIN_S = 4.0
"""After the shutdown timeout: the engine's last step, uvicorn's exit, flushing the logs."""
SHORT_TOKENS = 48



def body(max_tokens: int) -> dict:
    return {"prompt": "Hello", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}


def wait_exit(server: Server, timeout: float) -> float:
    """Wait for the process to exit; return how long it took (kill and fail past ``timeout``)."""
    t0 = time.monotonic()
    try:
        server.process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait(timeout=STOP_TIMEOUT_S)
        pytest.fail(f"server still running {timeout:.1f} s after the signal:\n{server.log()}")
    return time.monotonic() - t0


def test_ready_lifecycle_and_drain_on_sigterm(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    server = spawn_server(tiny_gguf, tmp_path_factory.mktemp("drain-server"),
                          env={"ROCMFORGE_SHUTDOWN_TIMEOUT": str(SHUTDOWN_TIMEOUT_S)})
    try:
        # Loading: the model is not loaded yet, so nothing listens (or /ready says 503).
        assert probe_ready(server) in (None, 503)
        wait_ready(server)
        url = server.url

        long_started, short_started = threading.Event(), threading.Event()
        long_stream = Background(lambda: stream_events(url, body(LONG_MAX_TOKENS), "long-stream", long_started))
        long_plain = Background(lambda: httpx.post(f"{url}/generate", json=body(LONG_MAX_TOKENS),
                                                   headers={"X-Request-Id": "long-plain"}, timeout=HTTP_TIMEOUT))
        assert long_started.wait(10.0), server.log()
        short_stream = Background(lambda: stream_events(url, body(SHORT_TOKENS), "short-stream", short_started))
        assert short_started.wait(10.0), server.log()

        with httpx.Client(base_url=url, timeout=HTTP_TIMEOUT) as client:
            assert wait_for(lambda: client.get("/status/long-plain").json().get("state") == "decode", 5.0)
            assert client.get("/ready").status_code == 200

            server.process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            # Draining, observed while the long requests are still in flight.
            ready = wait_for(lambda: (r := client.get("/ready")).status_code == 503 and r, 2.0)
            assert ready, "/ready did not turn 503 after SIGTERM"
            assert ready.json() == {"ready": False, "reason": "draining: shutting down"}
            assert client.get("/status/long-plain").json()["state"] == "decode"
            refused = client.post("/generate", json=body(2), headers={"X-Request-Id": "too-late"})
            error = assert_error_shape(refused, 503, "server_draining")
            assert error["type"] == "recoverable" and error["request_id"] == "too-late"
            health = client.get("/health")
            assert health.status_code == 200 and health.json()["draining"] is True

        # The short request was in flight at the signal and ends normally.
        short = short_stream.result(SHUTDOWN_TIMEOUT_S + EXIT_MARGIN_S)
        assert short[-1].event == "done", short[-3:]
        assert short[-1].json()["finish_reason"] == "length"
        assert short[-1].json()["usage"]["completion_tokens"] == SHORT_TOKENS
        assert "message" not in short[-1].json()

        # The long ones outlive the shutdown timeout: cancelled, saying why.
        events = long_stream.result(SHUTDOWN_TIMEOUT_S + EXIT_MARGIN_S)
        assert events[-1].event == "done", events[-3:]
        done = events[-1].json()
        assert done["finish_reason"] == "cancelled" and "shutting down" in done["message"], done
        assert 0 < done["usage"]["completion_tokens"] < LONG_MAX_TOKENS
        plain = long_plain.result(SHUTDOWN_TIMEOUT_S + EXIT_MARGIN_S)
        assert plain.status_code == 200, plain.text
        assert plain.json()["finish_reason"] == "cancelled" and "shutting down" in plain.json()["error"]
        # ... after the shutdown timeout, not before.
        assert time.monotonic() - signalled >= SHUTDOWN_TIMEOUT_S - 0.2

        wait_exit(server, SHUTDOWN_TIMEOUT_S + EXIT_MARGIN_S - (time.monotonic() - signalled))
        assert time.monotonic() - signalled < SHUTDOWN_TIMEOUT_S + EXIT_MARGIN_S
    finally:
        stop_server(server)
    log = server.log()
    assert server.process.returncode == 0, log
    assert "Traceback" not in log, log
    assert "SIGTERM received: draining" in log and "shutdown deadline reached: cancelling 2 requests" in log, log


def test_idle_server_exits_zero_at_once(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    server = spawn_server(tiny_gguf, tmp_path_factory.mktemp("idle-server"))
    try:
        wait_ready(server)
        server.process.send_signal(signal.SIGTERM)
        elapsed = wait_exit(server, EXIT_MARGIN_S)
    finally:
        stop_server(server)
    assert server.process.returncode == 0, server.log()
    assert elapsed < EXIT_MARGIN_S
    assert "Traceback" not in server.log(), server.log()


def test_second_signal_cancels_at_once(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """SIGINT (Ctrl-C) drains like SIGTERM; a second one does not wait for the 60 s timeout."""
    server = spawn_server(tiny_gguf, tmp_path_factory.mktemp("force-server"),
                          env={"ROCMFORGE_SHUTDOWN_TIMEOUT": "60"})
    try:
        wait_ready(server)
        started = threading.Event()
        stream = Background(lambda: stream_events(server.url, body(LONG_MAX_TOKENS), "held", started))
        assert started.wait(10.0), server.log()
        server.process.send_signal(signal.SIGINT)
        assert wait_for(lambda: probe_ready(server) == 503, 2.0), server.log()
        time.sleep(0.3)
        assert server.process.poll() is None  # still draining: the timeout is 60 s
        server.process.send_signal(signal.SIGINT)
        elapsed = wait_exit(server, EXIT_MARGIN_S)
        events = stream.result(EXIT_MARGIN_S)
    finally:
        stop_server(server)
    assert server.process.returncode == 0, server.log()
    assert elapsed < EXIT_MARGIN_S
    assert events[-1].event == "done" and events[-1].json()["finish_reason"] == "cancelled", events[-3:]
    assert "Traceback" not in server.log(), server.log()
