"""Memory planning: the KV pool's size from the device's memory, and the "does not fit" errors.

The policy is pure arithmetic on byte counts, so it is tested here with made-up devices; the
CPU placement path is checked end to end on the tiny model.
"""

from __future__ import annotations

import pytest
import torch
from tiny_engine import TINY_SPEC, TinyModel

from rocmforge import LLM, native
from rocmforge.engine.memory import (
    activation_workspace_bytes,
    check_weights_fit,
    module_bytes,
    plan_cpu_kv_cache,
    plan_gpu_kv_cache,
)
from rocmforge.errors import ConfigError, DeviceOutOfMemoryError
from rocmforge.gguf import read_gguf
from rocmforge.models.config import ModelConfig
from rocmforge.models.loader import placed_weight_bytes

GiB = 1 << 30
MiB = 1 << 20


def gpu_plan(**overrides: object):
    args = dict(
        device="cuda:0", free_bytes=10 * GiB, total_bytes=16 * GiB, weight_bytes=5 * GiB, workspace_bytes=1 * GiB,
        block_bytes=2 * MiB, block_size=16, min_tokens=256, max_useful_blocks=10**9, utilization=0.9,
    )
    args.update(overrides)
    return plan_gpu_kv_cache(**args)  # type: ignore[arg-type]


def test_gpu_pool_takes_what_is_left_after_workspace_and_reserve() -> None:
    plan = gpu_plan()
    reserve = int(0.1 * 16 * GiB)
    budget = 10 * GiB - 1 * GiB - reserve
    assert plan.reserve_bytes == reserve
    assert plan.num_blocks == budget // (2 * MiB) - 1  # one block is the runner's scratch block
    assert plan.kv_bytes == (plan.num_blocks + 1) * 2 * MiB <= budget
    text = plan.describe()
    for part in ("weights 5.0 GiB", "activation workspace 1.0 GiB", f"({plan.num_blocks} blocks)", "of 16.0 GiB"):
        assert part in text


def test_gpu_pool_is_capped_by_useful_blocks_and_by_an_explicit_budget() -> None:
    assert gpu_plan(max_useful_blocks=300).num_blocks == 300
    assert gpu_plan(kv_cache_memory=100 * MiB).num_blocks == 100 // 2 - 1
    # An explicit budget larger than what is free is cut to what is free.
    assert gpu_plan(kv_cache_memory=100 * GiB).num_blocks == gpu_plan().num_blocks


def test_higher_utilization_leaves_more_for_the_kv_cache() -> None:
    assert gpu_plan(utilization=0.95).num_blocks > gpu_plan(utilization=0.9).num_blocks > gpu_plan(
        utilization=0.8).num_blocks
    with pytest.raises(ValueError):
        gpu_plan(utilization=0.0)


def test_a_model_whose_kv_cache_cannot_fit_names_what_it_needs() -> None:
    # 1.7 GiB free: reserve 1.6 GiB + workspace 1 GiB already exceed it.
    with pytest.raises(DeviceOutOfMemoryError) as info:
        gpu_plan(free_bytes=int(1.7 * GiB), min_tokens=4096)
    error = info.value
    needed = 5 * GiB + 1 * GiB + (4096 // 16 + 1) * 2 * MiB + int(0.1 * 16 * GiB)
    assert error.details["needed_bytes"] == needed
    assert "does not fit on cuda:0" in error.message
    assert "KV cache for 4096 tokens" in error.message and "1.7 GiB of 16.0 GiB is free" in error.message


def test_weights_that_cannot_fit_fail_before_loading() -> None:
    check_weights_fit(4 * GiB, free_bytes=5 * GiB, total_bytes=8 * GiB, device="cuda:0")
    with pytest.raises(DeviceOutOfMemoryError) as info:
        check_weights_fit(15 * GiB, free_bytes=7 * GiB, total_bytes=8 * GiB, device="cuda:0")
    assert "weights need 15.0 GiB" in info.value.message and "7.0 GiB free of 8.0 GiB" in info.value.message
    assert info.value.details["needed_bytes"] == 15 * GiB


def test_cpu_pool_is_the_fixed_budget() -> None:
    plan = plan_cpu_kv_cache(kv_cache_memory=64 * MiB, weight_bytes=MiB, workspace_bytes=MiB, block_bytes=MiB,
                             max_useful_blocks=1000)
    assert plan.num_blocks == 63 and plan.total_bytes is None
    with pytest.raises(ConfigError):
        plan_cpu_kv_cache(kv_cache_memory=MiB, weight_bytes=0, workspace_bytes=0, block_bytes=MiB, max_useful_blocks=9)


def test_workspace_grows_with_the_batch_and_the_element_size(tiny_model: TinyModel) -> None:
    with read_gguf(tiny_model.path) as gguf:
        config = ModelConfig.from_gguf_metadata(gguf.metadata, vocab_size=TINY_SPEC.vocab_size)
    small = activation_workspace_bytes(config, 256, 8, torch.bfloat16)
    assert activation_workspace_bytes(config, 2048, 8, torch.bfloat16) > small
    assert activation_workspace_bytes(config, 256, 8, torch.float32) > small
    # At least the fp32 logits of every row and the residual stream of every token.
    assert small >= (256 + 8) * config.vocab_size * 4 + 256 * config.hidden_size * 2


def test_module_bytes_counts_tied_weights_once() -> None:
    embed = torch.nn.Embedding(100, 8)
    head = torch.nn.Linear(8, 100, bias=False)
    head.weight = embed.weight
    model = torch.nn.ModuleDict({"embed": embed, "head": head})
    assert module_bytes(model) == 100 * 8 * 4
    head.weight = torch.nn.Parameter(torch.zeros(100, 8))
    assert module_bytes(model) == 2 * 100 * 8 * 4


def test_placed_weight_bytes_counts_gguf_blocks_for_gpu_quantized_weights(tmp_path) -> None:
    from rocmforge.synthetic import SyntheticSpec, random_hf_weights, write_gguf

    spec = SyntheticSpec(hidden_size=64, intermediate_size=128, vocab_size=320)
    path = tmp_path / "q8.gguf"
    from gguf import GGMLQuantizationType as T

    write_gguf(path, spec, random_hf_weights(spec), tensor_type=lambda name: T.Q8_0)
    with read_gguf(path) as gguf:
        elements = sum(t.n_elements for t in gguf.tensors.values())
        dense = placed_weight_bytes(gguf, torch.bfloat16, "dense", torch.device("cuda"))
        quantized = placed_weight_bytes(gguf, torch.bfloat16, "auto", torch.device("cuda"))
        on_cpu = placed_weight_bytes(gguf, torch.bfloat16, "dense", torch.device("cpu"))
        native_cpu = placed_weight_bytes(gguf, torch.bfloat16, "quantized", torch.device("cpu"))
        matrices = [t for t in gguf.tensors.values() if len(t.shape) == 2]
        vectors = [t for t in gguf.tensors.values() if len(t.shape) == 1]
    assert dense == on_cpu == elements * 2
    # Q8_0: 34 bytes per 32 weights for every matrix (the embedding table too); norms at bf16.
    assert quantized == sum(t.nbytes for t in matrices) + sum(t.n_elements for t in vectors) * 2
    assert quantized < dense
    if native.available():  # the CPU's native kernels read the same blocks
        assert native_cpu == quantized


def test_llm_reports_its_memory_plan(tiny_model: TinyModel) -> None:
    llm = LLM(tiny_model.path, device="cpu", dtype="float32", kv_cache_memory=4 * MiB)
    plan = llm.memory_plan
    assert plan.device == "cpu"
    assert plan.weight_bytes == module_bytes(llm.engine.runner.model)
    assert plan.num_blocks == llm.engine.runner.num_blocks == 4 * MiB // plan.block_bytes - 1
    assert llm.engine.runner.kv_caches[0][0].shape[0] == plan.num_blocks + 1
