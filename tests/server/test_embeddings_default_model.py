"""``/v1/embeddings`` on the default model (SmolLM2-135M-Instruct, a generation model) served
with ``--pooling mean``, through the ``openai`` client.

A generation model's mean-pooled states are no trained sentence embedding, so nothing is
asserted about which texts come out close; what must hold is what any embedding server owes:
the same text gives the same vector, a batch gives what single calls give, and the vectors
are unit-length and of the model's hidden size (576).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import openai
import pytest
from live_server import Server, serving

pytestmark = pytest.mark.slow
MODEL = "smollm2"
HIDDEN_SIZE = 576
TEXTS = [
    "The cat sat on the mat.",
    "A kitten was sitting on the rug.",
    "Quarterly revenue grew by twelve percent.",
    "def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "Paris is the capital of France.",
    "The mitochondria is the powerhouse of the cell.",
]


@pytest.fixture(scope="module")
def default_server(default_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # Dense fp32 weights: with the CPU's quantized matmul kernels a prompt's rows do not come
    # out bit-alike at every batch shape (batched and single vectors differ by up to ~6e-3 on
    # this model), which is the kernels' rounding, not the batching this test checks.
    yield from serving(default_gguf, tmp_path_factory.mktemp("embed-default-log"), "--model-name", MODEL,
                       "--pooling", "mean", "--weight-format", "dense")


@pytest.fixture(scope="module")
def oai(default_server: Server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{default_server.url}/v1", api_key="unused", max_retries=0) as client:
        yield client


def _vectors(response) -> np.ndarray:
    return np.asarray([d.embedding for d in response.data], dtype=np.float64)


def test_the_same_text_gives_the_same_vector(oai: openai.OpenAI) -> None:
    first = _vectors(oai.embeddings.create(model=MODEL, input=TEXTS[0]))
    again = _vectors(oai.embeddings.create(model=MODEL, input=TEXTS[0]))
    assert first.shape == (1, HIDDEN_SIZE)
    assert abs(float(np.linalg.norm(first[0])) - 1.0) < 1e-5
    np.testing.assert_allclose(again, first, atol=1e-5, rtol=0)


def test_a_batch_equals_single_calls(oai: openai.OpenAI) -> None:
    response = oai.embeddings.create(model=MODEL, input=TEXTS)
    batch = _vectors(response)
    assert batch.shape == (len(TEXTS), HIDDEN_SIZE)
    singles = np.concatenate([_vectors(oai.embeddings.create(model=MODEL, input=text)) for text in TEXTS])
    np.testing.assert_allclose(batch, singles, atol=1e-5, rtol=0)
    distinct = batch @ batch.T
    assert np.all(distinct[~np.eye(len(TEXTS), dtype=bool)] < 1.0 - 1e-4)  # different texts, different vectors
    assert response.usage.prompt_tokens == response.usage.total_tokens > len(TEXTS)
