"""Fixtures of the documentation tests: live servers the examples run against, and their
``/metrics``.

The servers are real ``rocmforge serve`` processes on free loopback ports (helpers from
``tests/server/live_server.py``), serving a tiny random-weight GGUF whose vocabulary size and
context window match the default model's (49152 tokens, 8192 positions), under the default
model's name, so the documented requests (token ids included) are valid against it. One
server has no API key; one more is started per ``api-key=`` marker found in ``docs/API.md``.
They start together, once per session, and must exit 0 on SIGTERM.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "server"))

from doc_blocks import DOCS_DIR, blocks, read
from live_server import Server, stop_server
from spawned_server import wait_ready

from rocmforge.synthetic import SyntheticSpec, random_hf_weights, write_gguf

DOCS_MODEL_NAME = "SmolLM2-135M-Instruct.Q4_1"
DOCS_SPEC = SyntheticSpec(vocab_size=49152, max_context=8192)
"""The default model's vocabulary size and context window, in a model of a few MB."""


def documented_api_keys() -> list[str]:
    keys = {b.marker_options().get("api-key") for b in blocks(read(DOCS_DIR / "API.md")) if b.marker_kind == "test"}
    return sorted(k for k in keys if k)


def _spawn(gguf: Path, log_dir: Path, api_key: str | None) -> Server:
    import subprocess
    import tempfile

    from live_server import cli_env, free_port

    port = free_port()
    args = [sys.executable, "-m", "rocmforge.cli", "serve", "--gguf", str(gguf), "--addr", f"127.0.0.1:{port}",
            "--device", "cpu", "--dtype", "float32", "--model-name", DOCS_MODEL_NAME,
            "--pooling", "mean"]  # the Embeddings examples run with the documented --pooling mean
    if api_key:
        args += ["--api-key", api_key]
    log_path = log_dir / f"serve-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=cli_env(), cwd=tempfile.gettempdir())
    return Server(f"http://127.0.0.1:{port}", process, log_path)


@pytest.fixture(scope="session")
def docs_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str | None, Server]]:
    """``{None: server without a key, key: server requiring that key, ...}``, all ready."""
    directory = tmp_path_factory.mktemp("docs-server")
    gguf = directory / f"{DOCS_MODEL_NAME}.gguf"
    write_gguf(gguf, DOCS_SPEC, random_hf_weights(DOCS_SPEC, seed=7), seed=7)
    servers: dict[str | None, Server] = {}
    try:
        for key in [None, *documented_api_keys()]:
            servers[key] = _spawn(gguf, directory, key)
        for key, server in servers.items():
            # /ready needs the key when one is set: wait on /health there, then check /ready.
            if key is None:
                wait_ready(server)
            else:
                _wait_ready_with_key(server, key)
        yield servers
    finally:
        for server in servers.values():
            stop_server(server)
    for server in servers.values():
        assert server.process.returncode == 0, server.log()


def _wait_ready_with_key(server: Server, key: str, timeout: float = 60.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"server exited with {server.process.returncode} during start-up:\n{server.log()}")
        try:
            response = httpx.get(f"{server.url}/ready", headers={"Authorization": f"Bearer {key}"}, timeout=2.0)
            if response.status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    pytest.fail(f"server not ready within {timeout:.0f} s:\n{server.log()}")


@pytest.fixture(scope="session")
def docs_server(docs_servers: dict[str | None, Server]) -> Server:
    return docs_servers[None]


@pytest.fixture(scope="session")
def live_metrics(docs_server: Server) -> dict[str, set[str]]:
    """Sample name -> label names, from the live ``/metrics`` after one generation (so the
    labelled HTTP series exist too); ``_created`` samples left out."""
    from prometheus_client.parser import text_string_to_metric_families

    with httpx.Client(base_url=docs_server.url, timeout=30.0) as client:
        assert client.post("/generate", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200
        text = client.get("/metrics").text
    samples: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.name.endswith("_created"):
                samples.setdefault(sample.name, set()).update(sample.labels)
    return samples


@pytest.fixture(scope="session")
def live_metric_families(docs_server: Server) -> dict[str, str]:
    """Metric name as documented (counters with ``_total``, info with ``_info``) -> type."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{docs_server.url}/metrics", timeout=30.0).text
    names: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        if family.name.endswith("_created"):
            continue
        suffix = {"counter": "_total", "info": "_info"}.get(family.type, "")
        names[family.name + suffix] = family.type
    return names
