"""Starting and stopping real ``rocmforge serve`` processes, and HTTP helpers shared by the
server tests (fixtures live in ``conftest.py``; this module has a unique name so test
modules can import it).

In: a GGUF path and extra ``serve`` flags. Out: a :class:`Server` (base URL, process, log
file) that answered ``GET /ready`` with 200; ``stop_server`` sends SIGTERM, waits, and kills
the process only if it ignores the signal.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from rocmforge.synthetic import SyntheticSpec

TINY_SPEC = SyntheticSpec(tie_embeddings=False, max_context=4096)
"""4096-token context: a long ``ignore_eos`` request runs for many seconds on the CPU."""
MODEL_NAME = "tiny-server"
API_KEY = "test-key-0123456789"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
HTTP_TIMEOUT = httpx.Timeout(30.0, connect=5.0)
LONG_MAX_TOKENS = 4000
"""With ``ignore_eos``: a request that is still running when the test cancels it."""


@dataclass(frozen=True, slots=True)
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cli_env() -> dict[str, str]:
    """The environment of child processes: no ROCMFORGE_* settings leak in from outside."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROCMFORGE_")}
    env["ROCMFORGE_LOG_LEVEL"] = "warn"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_server(gguf: Path, log_dir: Path, *extra: str, api_key: str | None = None) -> Server:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [sys.executable, "-m", "rocmforge.cli", "serve", "--gguf", str(gguf), "--addr", f"127.0.0.1:{port}",
            "--device", "cpu", "--dtype", "float32", *extra]
    if api_key:
        args += ["--api-key", api_key]
    log_path = log_dir / f"serve-{port}.log"
    with log_path.open("wb") as log:
        # cwd: a directory without a .env file, so only the flags above configure the server.
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=cli_env(),
                                   cwd=tempfile.gettempdir())
    server = Server(url, process, log_path)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode} during start-up:\n{server.log()}")
        try:
            if httpx.get(f"{url}/ready", headers=headers, timeout=2.0).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    stop_server(server)
    pytest.fail(f"server not ready within {START_TIMEOUT_S:.0f} s:\n{server.log()}")


def stop_server(server: Server) -> None:
    """SIGTERM, wait; SIGKILL (and fail) only if the server ignores SIGTERM."""
    process = server.process
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT_S)
            pytest.fail(f"server ignored SIGTERM for {STOP_TIMEOUT_S:.0f} s and was killed:\n{server.log()}")
    assert process.returncode is not None


def serving(gguf: Path, log_dir: Path, *extra: str, api_key: str | None = None) -> Iterator[Server]:
    """A server for a fixture to yield from: started, then stopped with SIGTERM, which is a
    clean shutdown (admission stops, the engine drains, the process exits 0, no traceback)."""
    server = start_server(gguf, log_dir, *extra, api_key=api_key)
    try:
        yield server
    finally:
        stop_server(server)
    assert server.process.returncode == 0, server.log()
    assert "Traceback" not in server.log(), server.log()


# --- HTTP helpers ------------------------------------------------------------------------------


def assert_error_shape(response: httpx.Response, status: int | None = None, code: str | None = None) -> dict:
    """The one error shape ``{"error": {type, code, message, param, request_id}}``; the
    request id is the one echoed in the ``X-Request-Id`` response header."""
    if status is not None:
        assert response.status_code == status, response.text
    assert 400 <= response.status_code < 600, response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"type", "code", "message", "param", "request_id"}, error
    assert isinstance(error["type"], str) and error["type"]
    assert isinstance(error["code"], str) and error["code"]
    assert isinstance(error["message"], str) and error["message"]
    assert error["param"] is None or isinstance(error["param"], str)
    assert isinstance(error["request_id"], str) and error["request_id"]
    assert error["request_id"] == response.headers.get("x-request-id")
    if code is not None:
        assert error["code"] == code, error
    return error


def assert_anthropic_error(response: httpx.Response, status: int, error_type: str) -> str:
    """Anthropic's error shape ``{"type": "error", "error": {"type", "message"}, "request_id"}``
    (the ``/v1/messages*`` routes); the request id is the echoed ``X-Request-Id``. Returns the
    message."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"type", "error", "request_id"}, body
    assert body["type"] == "error" and body["request_id"] == response.headers.get("x-request-id"), body
    assert set(body["error"]) == {"type", "message"}, body
    assert body["error"]["type"] == error_type, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]["message"]


def metric_values(client: httpx.Client) -> dict[str, float]:
    """``/metrics`` parsed by the Prometheus text parser: unlabelled sample name -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if not sample.labels:
                values[sample.name] = sample.value
    return values


def wait_until_idle(client: httpx.Client, timeout: float = 5.0) -> dict[str, float]:
    """Poll ``/metrics`` until no request runs or waits and no KV block is in use; return
    the last values (the caller asserts on them)."""
    deadline = time.monotonic() + timeout
    while True:
        values = metric_values(client)
        idle = (values["rocmforge_requests_running"] == 0 and values["rocmforge_requests_waiting"] == 0
                and values["rocmforge_kv_cache_usage_ratio"] == 0)
        if idle or time.monotonic() > deadline:
            return values
        time.sleep(0.05)


def wait_for_status(client: httpx.Client, request_id: str, predicate: Callable[[dict], bool],
                    timeout: float = 5.0) -> dict:
    """Poll ``/status/{id}`` until ``predicate(body)`` holds or time runs out; return the
    last body (the caller asserts on it)."""
    deadline = time.monotonic() + timeout
    body: dict = {}
    while True:
        response = client.get(f"/status/{request_id}")
        if response.status_code == 200:
            body = response.json()
            if predicate(body):
                return body
        if time.monotonic() > deadline:
            return body
        time.sleep(0.05)
