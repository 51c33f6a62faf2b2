"""The Triton paged attention kernels, and the triton backend, against the torch reference.

Every case draws fresh random queries and caches (the whole cache is random, so a kernel
that reads a slot past a sequence's end, or a block outside its table, gets a wrong answer)
and scattered block tables, then compares the kernel with
:func:`rocmforge.attention.torch_ref.paged_attention` computed in fp32 on the same (rounded)
inputs. Without a GPU the kernels run in Triton's interpreter (``tests/conftest.py``), so the
shapes are small; the ``gpu`` tests repeat the comparison at serving shapes natively.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("triton")

from rocmforge.attention import (
    AttentionMetadata,
    get_backend,
    triton_paged,
)
from rocmforge.attention.torch_ref import TorchPagedAttention, paged_attention
from rocmforge.kernels import kernels_usable
from rocmforge.kernels.paged_attention import (
    DEFAULT_PARTITION_SIZE,
    MAX_PARTITIONS,
    default_partition_size,
    paged_decode_attention,
    paged_prefill_attention,
)

DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
TOLERANCE = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
"""Absolute and relative tolerance against the fp32 reference, by the inputs' dtype."""
pytestmark = pytest.mark.skipif(
    not kernels_usable(DEVICE), reason=f"Triton kernels cannot run on {DEVICE} (no GPU, no interpreter)"
)
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA/ROCm device")


@dataclass(slots=True)
class _Step:
    """One random step: queries, caches holding the whole context, metadata, fp32 oracle."""

    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    metadata: AttentionMetadata
    scale: float
    expected: torch.Tensor


def _step(
    name: str,
    query_lens: list[int],
    seq_lens: list[int],
    heads: int,
    kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype = torch.float32,
    table_dtype: torch.dtype = torch.int64,
    device: torch.device = DEVICE,
) -> _Step:
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    blocks = [-(-s // block_size) for s in seq_lens]
    pool = torch.randperm(sum(blocks) + 3, generator=gen).tolist()  # shuffled, with spares
    tables, start = [], 0
    for n in blocks:
        tables.append(pool[start : start + n])
        start += n
    cache_shape = (len(pool), block_size, kv_heads, head_dim)
    k_cache = torch.randn(cache_shape, generator=gen).to(device, dtype)
    v_cache = torch.randn(cache_shape, generator=gen).to(device, dtype)
    q = torch.randn(sum(query_lens), heads, head_dim, generator=gen).to(device, dtype)
    metadata = AttentionMetadata.build(query_lens, seq_lens, tables, block_size, device)
    metadata.block_tables = metadata.block_tables.to(table_dtype)
    metadata.seq_lens = metadata.seq_lens.to(table_dtype)
    scale = head_dim**-0.5
    expected = paged_attention(q.float(), k_cache.float(), v_cache.float(), metadata, scale)
    return _Step(q, k_cache, v_cache, metadata, scale, expected)


def _assert_matches(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.float(), expected, atol=tol, rtol=tol)


def _decode(step: _Step, **kwargs: object) -> torch.Tensor:
    md = step.metadata
    kwargs.setdefault("max_seq_len", md.max_seq_len)
    return paged_decode_attention(
        step.q, step.k_cache, step.v_cache, md.block_tables, md.seq_lens, step.scale, **kwargs
    )


def _prefill(step: _Step) -> torch.Tensor:
    md = step.metadata
    return paged_prefill_attention(
        step.q, step.k_cache, step.v_cache, md.block_tables, md.seq_lens, md.query_start_loc, step.scale,
        max_query_len=md.max_query_len,
    )


# name, heads, kv_heads, head_dim, block_size, dtype, table dtype, seq_lens, partition_size
DECODE_CASES = [
    ("mha-d64-bs16-boundaries", 4, 4, 64, 16, torch.float32, torch.int64, [15, 16, 17, 33], 512),
    ("gqa3-d80-bs8-int32", 6, 2, 80, 8, torch.float32, torch.int32, [1, 8, 9, 40], 512),
    ("gqa8-bs32", 8, 1, 64, 32, torch.float32, torch.int64, [31, 32, 64, 5], 512),
    ("split-k-5-partitions", 4, 2, 64, 16, torch.float32, torch.int32, [150, 97, 33, 16], 32),
    ("split-k-bs8-d96", 6, 2, 96, 8, torch.float32, torch.int64, [70, 47, 1], 16),
    ("split-k-bs128-tile-inside-block", 4, 2, 64, 128, torch.float32, torch.int64, [100, 129], 32),
    ("bf16-split-k", 4, 2, 64, 16, torch.bfloat16, torch.int32, [40, 17, 65], 32),
    ("fp16-gqa8-d80", 8, 1, 80, 32, torch.float16, torch.int64, [33, 64], 512),
]


@pytest.mark.parametrize("case", DECODE_CASES, ids=[c[0] for c in DECODE_CASES])
def test_decode_matches_reference(case: tuple) -> None:
    name, heads, kv_heads, head_dim, block_size, dtype, table_dtype, seq_lens, partition = case
    query_lens = [1] * len(seq_lens)
    step = _step(name, query_lens, seq_lens, heads, kv_heads, head_dim, block_size, dtype, table_dtype)
    out = _decode(step, partition_size=partition)
    assert out.dtype == dtype
    _assert_matches(out, step.expected, dtype)


@pytest.mark.parametrize("partition", [32, 512])
def test_decode_graph_mode_padding_rows(partition: int) -> None:
    """A CUDA-graph replay: the grid comes from the model's max length (256, far past every
    sequence), the output goes into a preallocated buffer, and padding rows (seq_len 0, a
    table of block 0) come out as zeros."""
    real = _step(f"graph-{partition}", [1, 1], [37, 5], 4, 2, 64, 16)
    md = real.metadata
    order = [0, 2]  # real rows among two padding rows: [real, pad, real, pad]
    q = torch.zeros(4, *real.q.shape[1:], device=DEVICE)
    q[order] = real.q
    q[[1, 3]] = torch.randn(2, *real.q.shape[1:], device=DEVICE)
    tables = torch.zeros(4, md.block_tables.shape[1], dtype=torch.int32, device=DEVICE)
    tables[order] = md.block_tables.to(torch.int32)
    seq_lens = torch.zeros(4, dtype=torch.int32, device=DEVICE)
    seq_lens[order] = md.seq_lens.to(torch.int32)
    out = torch.full_like(q, float("nan"))

    result = paged_decode_attention(
        q, real.k_cache, real.v_cache, tables, seq_lens, real.scale,
        max_seq_len=256, out=out, partition_size=partition,
    )
    assert result is out
    _assert_matches(out[order], real.expected, torch.float32)
    assert torch.equal(out[[1, 3]], torch.zeros_like(out[[1, 3]]))


@pytest.mark.parametrize("max_seq_len", [1, 40])
def test_decode_max_seq_len_below_a_context_is_still_exact(max_seq_len: int) -> None:
    """The last partition takes every position past the grid, so an underestimate costs time,
    not correctness."""
    step = _step(f"short-grid-{max_seq_len}", [1, 1], [70, 20], 4, 2, 64, 16)
    _assert_matches(_decode(step, max_seq_len=max_seq_len, partition_size=16), step.expected, torch.float32)


def test_long_graph_contexts_widen_the_partitions() -> None:
    """A graph captured for a 128k context launches at most MAX_PARTITIONS partitions per
    (sequence, KV head); the result is the same."""
    assert default_partition_size(0) == default_partition_size(8192) == DEFAULT_PARTITION_SIZE
    assert default_partition_size(131072) == 2048 and -(-131072 // 2048) == MAX_PARTITIONS
    assert -(-100_000 // default_partition_size(100_000)) <= MAX_PARTITIONS
    step = _step("long-graph", [1, 1], [70, 600], 4, 2, 64, 16)
    _assert_matches(_decode(step, max_seq_len=70_000), step.expected, torch.float32)


# name, heads, kv_heads, head_dim, block_size, dtype, table dtype, query_lens, seq_lens
PREFILL_CASES = [
    ("prefill-mha-two-query-tiles", 4, 4, 64, 16, torch.float32, torch.int64, [70, 5, 32], [70, 5, 32]),
    ("chunked-gqa3-d80-bs8-int32", 6, 2, 80, 8, torch.float32, torch.int32, [7, 30], [40, 33]),
    ("mixed-gqa8-bs32", 8, 1, 64, 32, torch.float32, torch.int64, [1, 1, 12, 30], [50, 17, 12, 45]),
    ("prefix-hit-at-block-boundary", 4, 2, 64, 16, torch.float32, torch.int32, [16, 1, 17], [48, 16, 33]),
    ("bs128-tile-inside-block", 4, 4, 64, 128, torch.float32, torch.int64, [70, 1], [130, 200]),
    ("bf16-mixed", 4, 2, 64, 16, torch.bfloat16, torch.int64, [1, 9, 24], [30, 9, 40]),
    ("fp16-d96-mixed", 6, 2, 96, 8, torch.float16, torch.int32, [5, 1, 33], [21, 64, 33]),
]


@pytest.mark.parametrize("case", PREFILL_CASES, ids=[c[0] for c in PREFILL_CASES])
def test_prefill_matches_reference(case: tuple) -> None:
    name, heads, kv_heads, head_dim, block_size, dtype, table_dtype, query_lens, seq_lens = case
    step = _step(name, query_lens, seq_lens, heads, kv_heads, head_dim, block_size, dtype, table_dtype)
    out = _prefill(step)
    assert out.dtype == dtype
    _assert_matches(out, step.expected, dtype)


def test_prefill_reads_strided_queries_and_writes_into_out() -> None:
    """q as the model hands it over (a view into a fused QKV projection), output into a
    preallocated buffer."""
    step = _step("strided", [9, 1], [20, 12], 4, 2, 64, 16)
    fused = torch.randn(step.q.shape[0], 4 + 2 * 2, 64, device=DEVICE)
    fused[:, :4] = step.q
    q_view = fused[:, :4]
    md = step.metadata
    out = torch.full_like(step.q, float("nan"))
    result = paged_prefill_attention(
        q_view, step.k_cache, step.v_cache, md.block_tables, md.seq_lens, md.query_start_loc, step.scale,
        max_query_len=md.max_query_len, out=out,
    )
    assert result is out
    _assert_matches(out, step.expected, torch.float32)


def _backend_step(
    name: str, query_lens: list[int], seq_lens: list[int]
) -> tuple[_Step, torch.Tensor, torch.Tensor]:
    """Caches holding each sequence's context before this step, and the step's new K/V."""
    heads, kv_heads, head_dim, block_size = 6, 2, 64, 16
    step = _step(name, query_lens, seq_lens, heads, kv_heads, head_dim, block_size)
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()) + 1)
    k_new = torch.randn(step.q.shape[0], kv_heads, head_dim, generator=gen).to(DEVICE)
    v_new = torch.randn(step.q.shape[0], kv_heads, head_dim, generator=gen).to(DEVICE)
    return step, k_new, v_new


@pytest.mark.parametrize(
    "query_lens,seq_lens,kernel",
    [
        ([1, 1, 1], [17, 1, 40], "paged_decode_attention"),
        ([1, 12, 5], [30, 12, 21], "paged_prefill_attention"),
    ],
    ids=["decode", "mixed"],
)
def test_backend_matches_torch_backend(
    query_lens: list[int], seq_lens: list[int], kernel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    step, k_new, v_new = _backend_step(f"backend-{kernel}", query_lens, seq_lens)
    calls: list[str] = []  # which kernel the backend picked

    def spy(name: str) -> Callable[..., torch.Tensor]:
        real = getattr(triton_paged, name)

        def call(*args: object, **kwargs: object) -> torch.Tensor:
            calls.append(name)
            return real(*args, **kwargs)

        return call

    for name in ("paged_decode_attention", "paged_prefill_attention"):
        monkeypatch.setattr(triton_paged, name, spy(name))
    torch_caches = (step.k_cache.clone(), step.v_cache.clone())
    triton_caches = (step.k_cache.clone(), step.v_cache.clone())

    backend = get_backend("triton")
    assert backend.name == "triton"
    expected = TorchPagedAttention().forward(step.q, k_new, v_new, *torch_caches, step.metadata, step.scale)
    out = backend.forward(step.q, k_new, v_new, *triton_caches, step.metadata, step.scale)

    assert calls == [kernel]
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)
    slots = step.metadata.slot_mapping
    for cache, new in zip(triton_caches, (k_new, v_new)):
        assert torch.equal(cache.view(-1, *cache.shape[2:])[slots], new)
    assert all(torch.equal(a, b) for a, b in zip(triton_caches, torch_caches))


def _valid_args(query_lens: list[int]) -> dict:
    step = _step("valid", query_lens, [5, 9], 4, 2, 64, 16)
    md = step.metadata
    return {
        "q": step.q, "k_cache": step.k_cache, "v_cache": step.v_cache, "block_tables": md.block_tables,
        "seq_lens": md.seq_lens, "query_start_loc": md.query_start_loc, "scale": step.scale,
        "max_seq_len": md.max_seq_len, "max_query_len": md.max_query_len,
    }


Mutation = Callable[[dict], None]
BAD_INPUTS: dict[str, tuple[Mutation, str]] = {  # what to break, and the message that names it
    "q-2d": (lambda a: a.update(q=a["q"][0]), "q must be"),
    "heads-not-multiple": (lambda a: a.update(q=a["q"][:, :3]), "not a multiple of num_kv_heads"),
    "head-dim-mismatch": (lambda a: a.update(q=a["q"][..., :32]), "head_dim"),
    "integer-q": (lambda a: a.update(q=a["q"].to(torch.int32)), "q must be float32"),
    "cache-shapes-differ": (lambda a: a.update(v_cache=a["v_cache"][:-1]), "k_cache and v_cache"),
    "cache-3d": (lambda a: a.update(k_cache=a["k_cache"][0], v_cache=a["v_cache"][0]), "k_cache and v_cache"),
    "strided-head-dim": (lambda a: a.update(k_cache=a["k_cache"].transpose(0, 3)), "k_cache"),
    "float-block-tables": (lambda a: a.update(block_tables=a["block_tables"].float()), "block_tables"),
    "block-tables-wrong-batch": (lambda a: a.update(block_tables=a["block_tables"][:1]), "block_tables"),
    "seq-lens-wrong-length": (lambda a: a.update(seq_lens=a["seq_lens"][:1]), "seq_lens"),
    "float-seq-lens": (lambda a: a.update(seq_lens=a["seq_lens"].float()), "seq_lens"),
    "out-wrong-dtype": (lambda a: a.update(out=torch.empty_like(a["q"], dtype=torch.float16)), "out must match"),
    "out-wrong-shape": (lambda a: a.update(out=torch.empty_like(a["q"][:1])), "out must match"),
}
BAD_DECODE_ONLY: dict[str, tuple[Mutation, str]] = {
    "partition-not-power-of-two": (lambda a: a.update(partition_size=48), "partition_size"),
    "negative-max-seq-len": (lambda a: a.update(max_seq_len=-1), "max_seq_len"),
}
BAD_PREFILL_ONLY: dict[str, tuple[Mutation, str]] = {
    "query-start-loc-2d": (lambda a: a.update(query_start_loc=a["query_start_loc"][None]), "query_start_loc"),
    "float-query-start-loc": (lambda a: a.update(query_start_loc=a["query_start_loc"].float()), "query_start_loc"),
    "query-start-loc-wrong-length": (lambda a: a.update(query_start_loc=a["query_start_loc"][:-1]), "one per sequence"),
    "zero-max-query-len": (lambda a: a.update(max_query_len=0), "max_query_len"),
}
DECODE_BAD = {**BAD_INPUTS, **BAD_DECODE_ONLY}
PREFILL_BAD = {**BAD_INPUTS, **BAD_PREFILL_ONLY}


def test_the_unbroken_arguments_are_accepted() -> None:
    decode = _valid_args([1, 1])
    del decode["query_start_loc"], decode["max_query_len"]
    prefill = _valid_args([3, 1])
    del prefill["max_seq_len"]
    assert paged_decode_attention(**decode).isfinite().all()
    assert paged_prefill_attention(**prefill).isfinite().all()


@pytest.mark.parametrize("bad", DECODE_BAD.values(), ids=DECODE_BAD.keys())
def test_decode_rejects_bad_inputs(bad: tuple[Mutation, str]) -> None:
    args = _valid_args([1, 1])
    del args["query_start_loc"], args["max_query_len"]
    mutate, message = bad
    mutate(args)
    with pytest.raises(ValueError, match=message):
        paged_decode_attention(**args)


@pytest.mark.parametrize("bad", PREFILL_BAD.values(), ids=PREFILL_BAD.keys())
def test_prefill_rejects_bad_inputs(bad: tuple[Mutation, str]) -> None:
    args = _valid_args([3, 1])
    del args["max_seq_len"]
    mutate, message = bad
    mutate(args)
    with pytest.raises(ValueError, match=message):
        paged_prefill_attention(**args)


# --- serving shapes on a real GPU ---------------------------------------------------------

CUDA = torch.device("cuda")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_decode_serving_shapes(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(7)
    seq_lens = torch.randint(1, 4097, (32,), generator=gen).tolist()
    seq_lens[:3] = [4096, 1, 16]
    step = _step(f"gpu-decode-{dtype}", [1] * 32, seq_lens, 32, 8, 128, 16, dtype, torch.int32, CUDA)
    _assert_matches(_decode(step, max_seq_len=4096), step.expected, dtype)


@pytest.mark.gpu
@gpu
def test_gpu_prefill_serving_shapes() -> None:
    query_lens, seq_lens = [512, 1, 1, 300, 77], [1536, 4096, 9, 300, 2000]
    step = _step("gpu-prefill", query_lens, seq_lens, 32, 8, 128, 16, torch.bfloat16, torch.int32, CUDA)
    _assert_matches(_prefill(step), step.expected, torch.bfloat16)


@pytest.mark.gpu
@gpu
def test_gpu_decode_replays_in_a_cuda_graph() -> None:
    """Captured once with the model's max length; replayed over steps whose lengths, queries
    and caches change in place, it matches the reference every time."""
    num_seqs, max_len, block_size = 8, 4096, 16
    first = _step("graph-0", [1] * num_seqs, [max_len] * num_seqs, 32, 8, 128, block_size, torch.bfloat16,
                  torch.int32, CUDA)
    md = first.metadata
    q, tables, seq_lens = first.q.clone(), md.block_tables.clone(), md.seq_lens.clone()
    out = torch.empty_like(q)

    def launch() -> None:
        paged_decode_attention(
            q, first.k_cache, first.v_cache, tables, seq_lens, first.scale, max_seq_len=max_len, out=out
        )

    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        launch()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        launch()

    gen = torch.Generator().manual_seed(3)
    for replay in range(3):
        lens = torch.randint(0, max_len + 1, (num_seqs,), generator=gen)
        lens[0] = 0  # a padding row
        q.copy_(torch.randn(q.shape, generator=gen))
        seq_lens.copy_(lens)
        graph.replay()
        live = [b for b in range(num_seqs) if lens[b] > 0]
        reference = AttentionMetadata.build(
            [1] * len(live), lens[live].tolist(), [tables[b].tolist() for b in live], block_size, CUDA
        )
        k_cache, v_cache = first.k_cache.float(), first.v_cache.float()
        expected = paged_attention(q[live].float(), k_cache, v_cache, reference, first.scale)
        _assert_matches(out[live], expected, torch.bfloat16)
        assert torch.equal(out[0], torch.zeros_like(out[0])), f"replay {replay}"
