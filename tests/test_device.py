"""Device selection, the GPU -> CPU fallback of ``device="auto"``, the translation of torch
device errors and the memory numbers ``/health`` reports. Runs on the CPU: GPU failures are
simulated (``ROCMFORGE_FAULT_INJECT=gpu_init``, or a loader that raises torch's OOM)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import rocmforge.engine.placement as placement_module
from rocmforge.device import device_error, memory_usage, resolve_device
from rocmforge.errors import ConfigError, DeviceError, DeviceOutOfMemoryError
from rocmforge.llm import LLM
from rocmforge.sampling_params import SamplingParams
from rocmforge.settings import Settings
from rocmforge.synthetic import SyntheticSpec, random_hf_weights, write_gguf
from rocmforge.testing.fault_spec import FaultInjection

SPEC = SyntheticSpec(tie_embeddings=False, max_context=256)
OOM_MESSAGE = "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 7.79 GiB total capacity)"


@pytest.fixture(scope="module")
def gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("device") / "tiny.gguf"
    write_gguf(path, SPEC, random_hf_weights(SPEC, seed=3), seed=3)
    return path


def test_cpu_and_unknown_specs() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ", fail_gpu_init=True) == torch.device("cpu")  # no GPU probe for cpu
    for bad in ("tpu", "cuda:x"):
        with pytest.raises(ConfigError):
            resolve_device(bad)


def test_simulated_gpu_init_failure_is_a_device_error_with_its_cause() -> None:
    for spec in ("auto", "cuda", "cuda:0"):
        with pytest.raises(DeviceError) as info:
            resolve_device(spec, fail_gpu_init=True)
        assert "could not be initialised" in info.value.message
        assert isinstance(info.value.__cause__, RuntimeError)
        assert "ROCMFORGE_FAULT_INJECT=gpu_init" in str(info.value.__cause__)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_auto_without_a_gpu_is_the_cpu_and_cuda_is_an_error() -> None:
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(DeviceError, match="no CUDA/ROCm GPU"):
        resolve_device("cuda")


def test_torch_oom_becomes_device_out_of_memory_naming_the_sizes() -> None:
    cause = torch.cuda.OutOfMemoryError(OOM_MESSAGE)
    error = device_error(cause, torch.device("cuda", 0), "loading the model", needed_bytes=3 << 30)
    assert isinstance(error, DeviceOutOfMemoryError)
    assert error.message == "out of memory on cuda:0 while loading the model (needs about 3.0 GiB, failed allocating 2.00 GiB)"
    assert error.details["needed_bytes"] == 3 << 30
    other = device_error(RuntimeError("HIP error: invalid device function"), torch.device("cuda", 1), "loading")
    assert type(other) is DeviceError and "cuda:1" in other.message and "invalid device function" in other.message
    assert device_error(error, torch.device("cuda", 0), "again") is error


def test_memory_usage_on_the_cpu_is_the_process_rss_against_the_ram() -> None:
    import resource

    memory = memory_usage(torch.device("cpu"))
    assert memory.kind == "process_rss"
    assert memory.used_bytes is not None and memory.total_bytes is not None
    # The current resident set: at least the interpreter and torch, about the peak at most.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert 10 << 20 < memory.used_bytes <= peak + (8 << 20)
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():  # Linux: the kernel's own account of the process and of the machine
        status = Path("/proc/self/status").read_text()
        vm_rss_kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
        assert abs(memory.used_bytes - vm_rss_kib * 1024) < 8 << 20
        total_kib = next(int(line.split()[1]) for line in meminfo.read_text().splitlines()
                         if line.startswith("MemTotal:"))
        assert memory.total_bytes == total_kib * 1024


def test_auto_falls_back_to_the_cpu_when_gpu_init_fails(gguf: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="rocmforge.engine.placement"):
        llm = LLM(gguf, device="auto", dtype="float16", faults=FaultInjection(gpu_init=True))
    assert llm.device == torch.device("cpu")
    assert llm.dtype == torch.float32  # float16 has no CPU kernels: the fallback uses the CPU default
    assert llm.device_fallback is not None and "simulated GPU initialisation failure" in llm.device_fallback
    assert any("falling back to the CPU" in r.getMessage() for r in caplog.records)
    [completion] = llm.generate("Hello", SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert len(completion.token_ids) == 3


def test_no_fallback_recorded_when_the_cpu_was_asked_for(gguf: Path) -> None:
    llm = LLM(gguf, device="cpu", faults=FaultInjection(gpu_init=True))
    assert llm.device == torch.device("cpu") and llm.device_fallback is None


def test_explicit_cuda_never_falls_back(gguf: Path) -> None:
    with pytest.raises(DeviceError) as info:
        LLM(gguf, device="cuda", faults=FaultInjection(gpu_init=True))
    assert isinstance(info.value.__cause__, RuntimeError)


@pytest.fixture
def gpu_that_runs_out_of_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """A visible GPU on which placing the weights raises torch's out-of-memory error."""
    real_load = placement_module.load_model

    def fake_resolve(spec: str, gpu_index: int = 0, *, fail_gpu_init: bool = False) -> torch.device:
        return torch.device("cpu") if spec == "cpu" else torch.device("cuda", 0)

    def load(gguf, *, device, **kwargs):
        if device.type == "cuda":
            raise torch.cuda.OutOfMemoryError(OOM_MESSAGE)
        return real_load(gguf, device=device, **kwargs)

    monkeypatch.setattr(placement_module, "resolve_device", fake_resolve)
    monkeypatch.setattr(placement_module, "free_memory", lambda device: (80 << 30, 80 << 30))
    monkeypatch.setattr(placement_module, "load_model", load)


@pytest.mark.usefixtures("gpu_that_runs_out_of_memory")
def test_auto_falls_back_when_the_weights_do_not_fit_on_the_gpu(gguf: Path) -> None:
    llm = LLM(gguf, device="auto")
    assert llm.device == torch.device("cpu") and llm.dtype == torch.float32
    assert llm.device_fallback is not None
    assert llm.device_fallback.startswith("out of memory on cuda:0 while loading the model (needs about ")
    assert "failed allocating 2.00 GiB" in llm.device_fallback


@pytest.mark.usefixtures("gpu_that_runs_out_of_memory")
def test_explicit_cuda_out_of_memory_is_typed_and_keeps_its_cause(gguf: Path) -> None:
    with pytest.raises(DeviceOutOfMemoryError) as info:
        LLM(gguf, device="cuda")
    assert isinstance(info.value.__cause__, torch.cuda.OutOfMemoryError)
    assert info.value.details["needed_bytes"] > 0  # the weights' size at the GPU dtype (bf16)
    assert info.value.http_status == 503 and info.value.code == "device_out_of_memory"


@pytest.fixture
def gpu_too_small(monkeypatch: pytest.MonkeyPatch) -> None:
    """A visible GPU with 64 KiB free of 1 GiB: the weights cannot fit, which the memory
    check says before anything is loaded on it."""
    real_load = placement_module.load_model

    def load(gguf, *, device, **kwargs):
        if device.type == "cuda":
            raise AssertionError("the weights were placed on a GPU that cannot hold them")
        return real_load(gguf, device=device, **kwargs)

    monkeypatch.setattr(placement_module, "resolve_device",
                        lambda spec, gpu_index=0, *, fail_gpu_init=False: torch.device("cpu") if spec == "cpu"
                        else torch.device("cuda", 0))
    monkeypatch.setattr(placement_module, "free_memory", lambda device: (64 << 10, 1 << 30))
    monkeypatch.setattr(placement_module, "load_model", load)


@pytest.mark.usefixtures("gpu_too_small")
def test_a_model_that_does_not_fit_names_what_it_needs(gguf: Path) -> None:
    with pytest.raises(DeviceOutOfMemoryError) as info:
        LLM(gguf, device="cuda")
    message = info.value.message
    assert message.startswith("the model does not fit on cuda:0: its weights need ")
    assert "64.0 KiB free of 1.0 GiB" in message
    # The weights at bf16: every element of the file at 2 bytes (the tiny model is all f32).
    from rocmforge.gguf import read_gguf

    with read_gguf(gguf) as file:
        elements = sum(t.n_elements for t in file.tensors.values())
    assert info.value.details["needed_bytes"] == elements * 2

    llm = LLM(gguf, device="auto")  # auto falls back to the CPU and says why
    assert llm.device == torch.device("cpu")
    assert llm.device_fallback is not None and llm.device_fallback.startswith("the model does not fit on cuda:0")


def test_settings_pass_the_faults_down(gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROCMFORGE_FAULT_INJECT", "gpu_init")
    settings = Settings(_env_file=None, gguf=str(gguf), device="auto", kv_cache_memory=4 << 20)
    llm = LLM.from_settings(settings)
    assert llm.device == torch.device("cpu") and llm.device_fallback is not None


def _compilation_error() -> Exception:
    """What Triton raises for a kernel it cannot compile (not a RuntimeError)."""
    import ast

    from triton.compiler.errors import CompilationError

    return CompilationError("tl.dot(a, b)", ast.parse("x"), "at 12:4: unsupported target for tl.dot")


def test_triton_kernels_that_fail_their_warm_up_give_way_to_torch_kernels(
    gguf: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Where the Triton path is chosen (a GPU; here the CPU through Triton's interpreter) and
    its warm-up step fails to compile, the model is placed again on the same device with
    torch's kernels: the reference attention, no decode graphs, dense weights."""
    from rocmforge.engine.model_runner import ModelRunner

    warm_ups: list[str] = []

    def failing_warm_up(self: ModelRunner) -> torch.Tensor:
        warm_ups.append(self.model.layers[0].self_attn.backend.name)
        raise _compilation_error()

    monkeypatch.setattr(placement_module, "default_backend", lambda device: "triton")
    monkeypatch.setattr(ModelRunner, "warm_up", failing_warm_up)
    # Dense, as a GPU falls back to: on the CPU, quantized would take the native kernels.
    llm = LLM(gguf, device="cpu", dtype="float32", weight_format="dense")
    assert warm_ups == ["triton"]  # the Triton placement was tried, once
    runner = llm.engine.runner
    assert runner.model.layers[0].self_attn.backend.name == "torch"
    assert runner.model.layers[0].self_attn.kernels is None and runner.decode_graphs is None
    assert llm.device == torch.device("cpu") and llm.device_fallback is None
    assert "the Triton kernels failed on cpu (CompilationError: " in caplog.text
    [completion] = llm.generate([5, 6, 7], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    assert len(completion.token_ids) == 4


def test_a_warm_up_failure_that_is_not_a_kernel_error_propagates(gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only kernel compile/launch errors send the placement to torch's kernels: a bug (here a
    ValueError, or a RuntimeError raised outside Triton) is raised as it is."""
    from rocmforge.engine.model_runner import ModelRunner

    monkeypatch.setattr(placement_module, "default_backend", lambda device: "triton")
    for error in (ValueError("a bug in the model code"), RuntimeError("shape mismatch outside Triton")):
        def failing_warm_up(self: ModelRunner, error: Exception = error) -> torch.Tensor:
            raise error

        monkeypatch.setattr(ModelRunner, "warm_up", failing_warm_up)
        with pytest.raises(type(error)) as info:
            LLM(gguf, device="cpu", dtype="float32")
        assert info.value is error


def test_kernel_errors_are_told_from_other_errors() -> None:
    from rocmforge.kernels import is_kernel_error

    assert is_kernel_error(_compilation_error())
    assert not is_kernel_error(ValueError("bug"))
    assert not is_kernel_error(RuntimeError("torch said no"))


def test_the_triton_placement_serves_like_the_torch_one(gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU placement — Triton attention, fused ops, warm-up, static decode steps — run on
    the CPU through Triton's interpreter gives the torch placement's greedy tokens."""
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
    expected = [c.token_ids for c in LLM(gguf, device="cpu", dtype="float32").generate(prompts, params)]
    monkeypatch.setattr(placement_module, "default_backend", lambda device: "triton")
    llm = LLM(gguf, device="cpu", dtype="float32", max_num_seqs=4)
    runner = llm.engine.runner
    assert runner.model.layers[0].self_attn.backend.name == "triton" and runner.decode_graphs is not None
    assert [c.token_ids for c in llm.generate(prompts, params)] == expected
