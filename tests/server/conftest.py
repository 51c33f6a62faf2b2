"""Fixtures of the HTTP server acceptance tests: real ``rocmforge serve`` processes on loopback.

A tiny random-weight llama GGUF is written into a temporary directory once per session.
Servers are session-scoped and few (each takes seconds to start): the default one, one with
an API key, one with a one-slot queue. Each is terminated with SIGTERM at teardown and must
exit cleanly. Helpers shared by the test modules are in :mod:`live_server`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from live_server import API_KEY, HTTP_TIMEOUT, MODEL_NAME, TINY_SPEC, Server, serving

from rocmforge.synthetic import random_hf_weights, write_gguf


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("server-model") / f"{MODEL_NAME}.gguf"
    write_gguf(path, TINY_SPEC, random_hf_weights(TINY_SPEC, seed=7), seed=7)
    return path


def _serve(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory, *extra: str,
           api_key: str | None = None) -> Iterator[Server]:
    yield from serving(tiny_gguf, tmp_path_factory.mktemp("server-log"), "--model-name", MODEL_NAME, *extra,
                       api_key=api_key)


@pytest.fixture(scope="session")
def server(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The default server: no API key, default queue sizes."""
    yield from _serve(tiny_gguf, tmp_path_factory)


@pytest.fixture(scope="session")
def base_url(server: Server) -> str:
    return server.url


@pytest.fixture(scope="session")
def auth_server(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from _serve(tiny_gguf, tmp_path_factory, api_key=API_KEY)


@pytest.fixture(scope="session")
def small_server(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One running slot and one waiting slot: a third concurrent request is refused."""
    yield from _serve(tiny_gguf, tmp_path_factory, "--max-num-seqs", "1", "--max-waiting", "1")


@pytest.fixture
def client(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=HTTP_TIMEOUT) as c:
        yield c


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """For in-process tests on the tiny model: its ops take microseconds, so OpenMP thread
    wake-ups would dominate."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
