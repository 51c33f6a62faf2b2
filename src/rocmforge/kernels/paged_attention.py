"""Triton paged attention over the KV cache: split-K decode and flash-attention prefill.

In: queries (``[B, H, D]`` for decode, the flattened ``[T, H, D]`` batch for prefill), the
layer's K and V caches ``[num_blocks, block_size, KVH, D]`` already holding this step's keys,
and the step's block tables, context lengths and (prefill) query offsets, all on the device
(the layout is drawn in :mod:`rocmforge.attention.metadata`). Out: ``[*, H, D]`` in the
queries' dtype, written into the caller's ``out`` when given. The caller owns every tensor;
the decode path allocates a small fp32 workspace per call. Neither launch reads a device
value on the host, so both can be captured in a CUDA graph. The oracle these kernels are
tested against is :func:`rocmforge.attention.torch_ref.paged_attention`.

Both kernels walk a sequence's context in tiles of ``BLOCK_N`` positions and find each
position's cache row through the block table, so the tile size is independent of the cache
block size (a tile may span several small blocks or cover part of a large one)::

    position p of seq b ─▶ block  = block_tables[b, p // block_size]
                          slot   = p % block_size
                          K row  = k_cache[block, slot, kv_head, :]

GQA: one program serves the ``G = H / KVH`` query heads that share a KV head, so every K/V
tile is loaded once per group, and the group's query rows are stacked into one ``tl.dot``
operand (padded to at least 16 rows).

Decode (one query per sequence, at position ``seq_len - 1``) is flash-decoding: grid
``(B, KVH, P)`` with ``P = cdiv(max_seq_len, partition_size)`` taken from a host integer, so
the grid does not depend on the step's lengths. Partition ``p`` covers positions
``[p * partition_size, (p + 1) * partition_size)``; the last one also takes any positions
past ``P * partition_size`` (so a too-small ``max_seq_len`` is slow, never wrong), and a
partition starting at or past ``seq_len`` does nothing. Each partition stores its running
max ``m``, sum of exponentials ``l`` and unnormalised output ``acc`` (fp32); a reduce kernel,
grid ``(B, H)``, rescales them to the global max and divides. With ``P == 1`` the partition
kernel writes the output directly and no reduce runs.

Prefill: grid ``(B, KVH, cdiv(max_query_len, BLOCK_Q))``. A program takes ``BLOCK_Q``
consecutive queries of one sequence times the ``G`` heads of one KV head, one row each::

    row r ─▶ query  i    = tile * BLOCK_Q + r // G      (position s_b - q_b + i)
             head   h    = kv_head * G + r % G          (rows past BLOCK_Q * G are padding)

It runs an online softmax over KV tiles up to the tile's last query position, with the
causal mask ``key_pos <= query_pos``; tiles past that position are never visited.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from rocmforge.kernels import interpreter_active

DEFAULT_PARTITION_SIZE = 512
"""Context positions per decode partition (a multiple of the decode KV tile)."""
MAX_PARTITIONS = 64
"""Above ``MAX_PARTITIONS * DEFAULT_PARTITION_SIZE`` positions of ``max_seq_len``, the
default partition widens (powers of two) to keep at most this many: a CUDA graph captured
for a 128k context would otherwise launch 256 programs per (sequence, KV head) in every
layer, nearly all exiting at once for the short sequences of a typical step."""

_LOG2_E = 1.4426950408889634
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INDEX_DTYPES = (torch.int32, torch.int64)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    max_seq_len: int,
    out: torch.Tensor | None = None,
    partition_size: int | None = None,
) -> torch.Tensor:
    """Attention of one query per sequence (``q: [B, H, D]``, the newest token) over keys
    ``0 .. seq_lens[b] - 1``. ``max_seq_len`` (host int, at least every ``seq_lens[b]`` for
    speed) fixes the split-K grid; ``partition_size`` is the split width (a power of two
    >= 16; default :func:`default_partition_size`). A sequence with ``seq_lens[b] == 0``
    gets zeros. Returns ``out`` (or a new tensor) of q's shape and dtype."""
    if q.dim() != 3:
        raise ValueError(f"decode q must be [num_seqs, num_heads, head_dim], got shape {tuple(q.shape)}")
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads, block_size = _check_common(q, k_cache, v_cache, block_tables, seq_lens, num_seqs)
    if max_seq_len < 0:
        raise ValueError(f"max_seq_len must be >= 0, got {max_seq_len}")
    if partition_size is None:
        partition_size = default_partition_size(max_seq_len)
    if partition_size < 16 or partition_size & (partition_size - 1):
        raise ValueError(f"partition_size must be a power of two >= 16, got {partition_size}")
    out = _check_out(out, q)
    if num_seqs == 0:
        return out

    group = num_heads // num_kv_heads
    block_d = _pow2_at_least(head_dim, 16)
    block_n = min(_tile_rows(block_d, q.element_size()), partition_size)
    num_partitions = max(1, -(-max_seq_len // partition_size))
    single = num_partitions == 1
    if single:  # the partition kernel writes `out`; the workspace pointers go unused
        ws_acc = ws_max = ws_sum = out
    else:
        cells = (num_seqs, num_heads, num_partitions)
        ws_acc = torch.empty(*cells, head_dim, dtype=torch.float32, device=q.device)
        ws_max = torch.empty(cells, dtype=torch.float32, device=q.device)
        ws_sum = torch.empty_like(ws_max)
    _decode_partition_kernel[(num_seqs, num_kv_heads, num_partitions)](
        q, k_cache, v_cache, block_tables, seq_lens, out, ws_acc, ws_max, ws_sum,
        scale * _LOG2_E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, BLOCK_G=_pow2_at_least(group, 16), HEAD_DIM=head_dim, BLOCK_D=block_d,
        CACHE_BLOCK=block_size, BLOCK_N=block_n, PARTITION=partition_size, SINGLE_PARTITION=single,
        **_dot_config(q.dtype),
        # fp32's IEEE dot runs on FMAs, not tensor cores: with 4 warps it spills at head_dim
        # 128 on sm_90 (255 registers + 408 bytes of stack); 8 warps need 54 registers.
        num_warps=8 if q.dtype == torch.float32 and block_d >= 128 else 4,
        enable_fp_fusion=True,  # FMAs wanted; explicit, as Triton 3.10 turns the default off
    )
    if not single:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            ws_acc, ws_max, ws_sum, seq_lens, out,
            out.stride(0), out.stride(1), num_partitions,
            PARTITION=partition_size,
            BLOCK_P=min(_pow2_at_least(num_partitions, 1), 32), HEAD_DIM=head_dim, BLOCK_D=block_d,
            num_warps=4, enable_fp_fusion=True,
        )
    return out


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    *,
    max_query_len: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of the flattened queries ``q: [T, H, D]`` (sequence b's queries are
    rows ``query_start_loc[b] .. query_start_loc[b+1] - 1``, at positions
    ``seq_lens[b] - q_len_b ..``) over their sequences' cached context. ``max_query_len``
    (host int) must be at least every ``q_len_b``. Returns ``out`` (or a new tensor) of q's
    shape and dtype."""
    if q.dim() != 3:
        raise ValueError(f"prefill q must be [num_tokens, num_heads, head_dim], got shape {tuple(q.shape)}")
    num_tokens, num_heads, head_dim = q.shape
    starts = query_start_loc
    if starts.dim() != 1 or starts.shape[0] < 1 or starts.dtype not in _INDEX_DTYPES:
        raise ValueError(
            "query_start_loc must be int32/int64 of shape (num_seqs + 1,), "
            f"got {starts.dtype} {tuple(starts.shape)}"
        )
    num_seqs = int(starts.shape[0]) - 1
    if seq_lens.dim() == 1 and seq_lens.shape[0] != num_seqs:
        raise ValueError(
            f"query_start_loc has {num_seqs + 1} entries, seq_lens {seq_lens.shape[0]}: "
            "it needs one per sequence plus one"
        )
    num_kv_heads, block_size = _check_common(q, k_cache, v_cache, block_tables, seq_lens, num_seqs)
    if starts.device != q.device:
        raise ValueError(f"query_start_loc is on {starts.device}, q on {q.device}")
    if max_query_len < 1:
        raise ValueError(f"max_query_len must be >= 1, got {max_query_len}")
    out = _check_out(out, q)
    if num_tokens == 0 or num_seqs == 0:
        return out

    group = num_heads // num_kv_heads
    block_d = _pow2_at_least(head_dim, 16)
    block_m = max(_pow2_at_least(group, 16), _tile_rows(block_d, q.element_size()))
    block_q = block_m // group
    _prefill_kernel[(num_seqs, num_kv_heads, -(-max_query_len // block_q))](
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out,
        scale * _LOG2_E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, BLOCK_Q=block_q, BLOCK_M=block_m, HEAD_DIM=head_dim,
        BLOCK_D=block_d, CACHE_BLOCK=block_size,
        BLOCK_N=_tile_rows(block_d, q.element_size()), **_dot_config(q.dtype),
        num_warps=8 if block_m * block_d >= 64 * 128 else 4,  # 4 warps spill at 64 x 128 on sm_90
        enable_fp_fusion=True,
    )
    return out


def default_partition_size(max_seq_len: int) -> int:
    """:data:`DEFAULT_PARTITION_SIZE`, widened to a power of two that keeps the partitions of
    ``max_seq_len`` at most :data:`MAX_PARTITIONS`."""
    return max(DEFAULT_PARTITION_SIZE, _pow2_at_least(max(1, -(-max_seq_len // MAX_PARTITIONS)), 16))


def _pow2_at_least(value: int, floor: int) -> int:
    return max(floor, 1 << max(0, math.ceil(math.log2(value))))


def _tile_rows(block_d: int, itemsize: int) -> int:
    """Rows of a Q or K/V tile: 64 for 16-bit heads up to 128 wide, halved for each doubling
    of the tile's bytes per row (fp32, wider heads), never below 16 (``tl.dot``), so a tile
    stays within 16 KiB and the kernels fit MI300's 64 KiB of shared memory."""
    return max(16, min(64, 16384 // (block_d * itemsize)))


def _dot_config(dtype: torch.dtype) -> dict[str, object]:
    """The kernels' ``tl.dot`` settings for queries of ``dtype``: the operand dtype (the
    queries' own; fp32 products run in full precision, not TF32), and whether to widen the
    rounded operands to fp32 first, for bf16 under Triton's CPU interpreter, whose ``tl.dot``
    multiplies bf16 bit patterns as integers (triton-lang/triton#11584)."""
    operand = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]
    return {"DOT_DTYPE": operand, "UPCAST": dtype == torch.bfloat16 and interpreter_active()}


def _check_common(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    num_seqs: int,
) -> tuple[int, int]:
    """Validate what decode and prefill share; return (num_kv_heads, block_size)."""
    num_heads, head_dim = q.shape[1:]
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            "k_cache and v_cache must both be [num_blocks, block_size, num_kv_heads, head_dim], "
            f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    _, block_size, num_kv_heads, cache_head_dim = k_cache.shape
    if cache_head_dim != head_dim:
        raise ValueError(f"q head_dim {head_dim} != cache head_dim {cache_head_dim}")
    if head_dim == 0:
        raise ValueError("head_dim must be >= 1")
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if block_size < 1:
        raise ValueError(f"cache block_size must be >= 1, got {block_size}")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last (head_dim) dimension")
    tables = block_tables
    if tables.dim() != 2 or tables.shape[0] != num_seqs or tables.dtype not in _INDEX_DTYPES:
        raise ValueError(
            f"block_tables must be int32/int64 [{num_seqs}, max_blocks], "
            f"got {tables.dtype} {tuple(tables.shape)}"
        )
    if tables.stride(1) != 1:
        raise ValueError("block_tables must be contiguous along its rows")
    if seq_lens.shape != (num_seqs,) or seq_lens.dtype not in _INDEX_DTYPES:
        raise ValueError(
            f"seq_lens must be int32/int64 of shape ({num_seqs},), "
            f"got {seq_lens.dtype} {tuple(seq_lens.shape)}"
        )
    on_device = {"k_cache": k_cache, "v_cache": v_cache, "block_tables": tables, "seq_lens": seq_lens}
    for name, t in on_device.items():
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")
    return num_kv_heads, block_size


def _check_out(out: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty_like(q, memory_format=torch.contiguous_format)
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(
            f"out must match q ({tuple(q.shape)} {q.dtype} on {q.device}), "
            f"got {tuple(out.shape)} {out.dtype} on {out.device}"
        )
    if out.stride(-1) != 1:
        raise ValueError("out must be contiguous in its last (head_dim) dimension")
    return out


@triton.jit
def _attend_tile(
    q, m, l, acc,
    k_ptr, v_ptr, table_row, tile_start, kv_end, q_pos,
    stride_kb, stride_ks, stride_vb, stride_vs,
    scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CACHE_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, DOT_DTYPE: tl.constexpr, UPCAST: tl.constexpr,
):
    """One online-softmax step: rows of ``q`` [R, BLOCK_D] against context positions
    ``tile_start .. tile_start + BLOCK_N - 1`` (those < kv_end; with CAUSAL also <= the row's
    ``q_pos``). ``k_ptr``/``v_ptr`` point at the KV head's column of the caches. Returns the
    updated running max (log2 domain), sum and unnormalised output."""
    pos = tile_start + tl.arange(0, BLOCK_N)
    pos_ok = pos < kv_end
    block = tl.load(table_row + pos // CACHE_BLOCK, mask=pos_ok, other=0).to(tl.int64)
    slot = pos % CACHE_BLOCK
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM

    k = tl.load(  # [BLOCK_D, BLOCK_N]: loaded transposed, ready for q @ k
        k_ptr + block[None, :] * stride_kb + slot[None, :] * stride_ks + d[:, None],
        mask=d_ok[:, None] & pos_ok[None, :], other=0.0,
    )
    s = _dot(q, k.to(DOT_DTYPE), UPCAST) * scale_log2
    if CAUSAL:
        visible = pos_ok[None, :] & (pos[None, :] <= q_pos[:, None])
    else:
        visible = pos_ok[None, :]
    s = tl.where(visible, s, float("-inf"))

    m_new = tl.maximum(m, tl.max(s, 1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[:, None])
    l = l * alpha + tl.sum(p, 1)
    v = tl.load(
        v_ptr + block[:, None] * stride_vb + slot[:, None] * stride_vs + d[None, :],
        mask=pos_ok[:, None] & d_ok[None, :], other=0.0,
    )
    acc = acc * alpha[:, None] + _dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), UPCAST)
    return m_new, l, acc


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr):
    """``a @ b`` accumulated in fp32; with ``UPCAST`` (see ``_dot_config``) the operands,
    already rounded to their dtype, are widened to fp32 first: the GPU's products."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _decode_partition_kernel(
    q_ptr, k_ptr, v_ptr, tables_ptr, seq_lens_ptr, out_ptr, ws_acc_ptr, ws_max_ptr, ws_sum_ptr,
    scale_log2,
    stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ts,
    stride_os, stride_oh,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    CACHE_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, PARTITION: tl.constexpr,
    SINGLE_PARTITION: tl.constexpr, DOT_DTYPE: tl.constexpr, UPCAST: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)
    num_parts = tl.num_programs(2)
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    start = part * PARTITION
    end = tl.where(part == num_parts - 1, seq_len, tl.minimum(start + PARTITION, seq_len))

    rows = tl.arange(0, BLOCK_G)
    row_ok = rows < GROUP
    heads = kv_head * GROUP + rows
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q = tl.load(
        q_ptr + seq.to(tl.int64) * stride_qs + heads[:, None] * stride_qh + d[None, :],
        mask=row_ok[:, None] & d_ok[None, :], other=0.0,
    ).to(DOT_DTYPE)
    m = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    table_row = tables_ptr + seq.to(tl.int64) * stride_ts
    k_head = k_ptr + kv_head * stride_kh
    v_head = v_ptr + kv_head * stride_vh
    for tile_start in range(start, end, BLOCK_N):
        m, l, acc = _attend_tile(
            q, m, l, acc, k_head, v_head, table_row, tile_start, end, None,
            stride_kb, stride_ks, stride_vb, stride_vs, scale_log2,
            HEAD_DIM, BLOCK_D, CACHE_BLOCK, BLOCK_N, False, DOT_DTYPE, UPCAST,
        )

    if SINGLE_PARTITION:  # seq_len 0: acc and l are 0, the output is 0
        o = acc / tl.where(l > 0, l, 1.0)[:, None]
        tl.store(
            out_ptr + seq.to(tl.int64) * stride_os + heads[:, None] * stride_oh + d[None, :],
            o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :],
        )
    elif start < seq_len:  # workspace [B, H, P(, D)]; the reduce skips partitions past seq_len
        cell = (seq * tl.num_programs(1) * GROUP + heads).to(tl.int64) * num_parts + part
        tl.store(ws_max_ptr + cell, m, mask=row_ok)
        tl.store(ws_sum_ptr + cell, l, mask=row_ok)
        acc_cell = ws_acc_ptr + cell[:, None] * HEAD_DIM + d[None, :]
        tl.store(acc_cell, acc, mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _decode_reduce_kernel(
    ws_acc_ptr, ws_max_ptr, ws_sum_ptr, seq_lens_ptr, out_ptr,
    stride_os, stride_oh, num_partitions,
    PARTITION: tl.constexpr, BLOCK_P: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    live_parts = tl.minimum((seq_len + PARTITION - 1) // PARTITION, num_partitions)
    base = (seq * tl.num_programs(1) + head).to(tl.int64) * num_partitions
    parts = tl.arange(0, BLOCK_P)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM

    m_seen = tl.full([BLOCK_P], float("-inf"), dtype=tl.float32)
    for first in range(0, live_parts, BLOCK_P):
        idx = first + parts
        m_part = tl.load(ws_max_ptr + base + idx, mask=idx < live_parts, other=float("-inf"))
        m_seen = tl.maximum(m_seen, m_part)
    m_all = tl.max(m_seen, 0)
    m_all = tl.where(m_all == float("-inf"), 0.0, m_all)  # no live partition (seq_len 0)

    total = tl.zeros([BLOCK_P], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for first in range(0, live_parts, BLOCK_P):
        idx = first + parts
        ok = idx < live_parts
        weight = tl.exp2(tl.load(ws_max_ptr + base + idx, mask=ok, other=float("-inf")) - m_all)
        total += weight * tl.load(ws_sum_ptr + base + idx, mask=ok, other=0.0)
        part_acc = tl.load(
            ws_acc_ptr + (base + idx)[:, None] * HEAD_DIM + d[None, :],
            mask=ok[:, None] & d_ok[None, :], other=0.0,
        )
        acc += tl.sum(weight[:, None] * part_acc, 0)
    denom = tl.sum(total, 0)
    o = acc / tl.where(denom > 0, denom, 1.0)
    tl.store(
        out_ptr + seq.to(tl.int64) * stride_os + head * stride_oh + d,
        o.to(out_ptr.dtype.element_ty), mask=d_ok,
    )


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, tables_ptr, seq_lens_ptr, query_start_ptr, out_ptr,
    scale_log2,
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ts,
    stride_ot, stride_oh,
    GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, CACHE_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, DOT_DTYPE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    q_tile = tl.program_id(2)
    q_start = tl.load(query_start_ptr + seq).to(tl.int32)
    q_len = tl.load(query_start_ptr + seq + 1).to(tl.int32) - q_start
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    prefix = seq_len - q_len  # context cached before this step's queries
    first_q = q_tile * BLOCK_Q
    # Keys past the tile's last query position are never needed; an empty tile visits none.
    kv_end = tl.where(first_q < q_len, prefix + tl.minimum(first_q + BLOCK_Q, q_len), 0)

    rows = tl.arange(0, BLOCK_M)
    query = first_q + rows // GROUP
    heads = kv_head * GROUP + rows % GROUP
    row_ok = (rows < BLOCK_Q * GROUP) & (query < q_len)
    q_pos = prefix + query
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    token = (q_start + query).to(tl.int64)
    q = tl.load(
        q_ptr + token[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :],
        mask=row_ok[:, None] & d_ok[None, :], other=0.0,
    ).to(DOT_DTYPE)
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    table_row = tables_ptr + seq.to(tl.int64) * stride_ts
    k_head = k_ptr + kv_head * stride_kh
    v_head = v_ptr + kv_head * stride_vh
    # Every row sees key 0 (its position is >= 0), so no row's max stays -inf.
    for tile_start in range(0, kv_end, BLOCK_N):
        m, l, acc = _attend_tile(
            q, m, l, acc, k_head, v_head, table_row, tile_start, kv_end, q_pos,
            stride_kb, stride_ks, stride_vb, stride_vs, scale_log2,
            HEAD_DIM, BLOCK_D, CACHE_BLOCK, BLOCK_N, True, DOT_DTYPE, UPCAST,
        )
    o = acc / tl.where(l > 0, l, 1.0)[:, None]
    tl.store(
        out_ptr + token[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :],
        o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :],
    )
