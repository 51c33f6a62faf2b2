"""Shared fixtures: the default model and the reference data beside the checkout.

Tests that need either skip cleanly when it is absent (a fresh clone without `make pull`,
or a checkout without ``../shared``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

# Triton kernels run on CPU tensors through Triton's interpreter when no GPU is visible. The
# switch is read when a kernel is decorated, so it must be set before anything imports them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_REFERENCE = REPO_ROOT.parent / "shared" / "reference"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _models_dir() -> Path:
    env = os.environ.get("ROCMFORGE_MODELS")
    return Path(env) if env else Path.home() / ".cache" / "rocmforge" / "models"


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    path = _models_dir() / DEFAULT_MODEL_FILE
    if not path.is_file():
        pytest.skip(f"default model not found at {path} (run `rocmforge pull smollm2`)")
    return path


@pytest.fixture(scope="session")
def reference_hf() -> dict:
    return _load_reference("smollm2-135m-instruct-q4_1.hf-fp32.json")


@pytest.fixture(scope="session")
def reference_llamacpp() -> dict:
    return _load_reference("smollm2-135m-instruct-q4_1.llamacpp.json")


def _load_reference(name: str) -> dict:
    path = SHARED_REFERENCE / name
    if not path.is_file():
        pytest.skip(f"reference data not found at {path}")
    return json.loads(path.read_text())
