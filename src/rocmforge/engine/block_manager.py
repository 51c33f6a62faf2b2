"""KV block pool with reference counts and automatic prefix caching (integers only).

Flows in: :class:`~rocmforge.engine.request.Request` objects from the scheduler. Flows out:
block ids written into ``request.block_ids`` (the block table the model runner turns into
device tensors). This module owns the pool (which block is free, who references it, which
full block holds which token prefix); the runner owns the K/V tensors themselves.

Prefix caching: every *full* block of a request gets a chained hash
``H_i = hash(H_{i-1}, tokens of block i)``, so a hash names a whole token prefix. Full,
computed blocks are registered in ``hash -> block id``. A block whose reference count drops
to 0 goes to the free list but keeps its hash, so a later request with the same prefix can
take it back until the block is evicted. The free list is LRU: ``allocate`` takes the least
recently freed block (and drops its hash); ``free`` releases a table tail first, so a
sequence's tail is evicted before its head.

Rules: only full blocks are ever shared; new tokens are only ever written into blocks with
reference count 1 (fresh blocks, or the private partially-filled last block of a table).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from rocmforge.engine.request import Request
from rocmforge.errors import ConfigError, KVCacheError


def hash_block_tokens(parent_hash: int | None, token_ids: Sequence[int]) -> int:
    """Chained hash of one full block: names the whole prefix ending with this block.

    128 bits of SHA-256, not Python's ``hash``: a collision would silently serve another
    prompt's K/V, and this is stable across processes. Token ids must fit in int64.
    """
    h = hashlib.sha256(b"root" if parent_hash is None else parent_hash.to_bytes(16, "little"))
    h.update(array("q", token_ids).tobytes())
    return int.from_bytes(h.digest()[:16], "little")


@dataclass(slots=True)
class Block:
    """One KV block of the pool."""

    block_id: int
    ref_count: int = 0
    """Number of request block tables holding this block."""
    block_hash: int | None = None
    """Set while the block is registered in the prefix cache (then it is full)."""


@dataclass(slots=True)
class PrefixCacheStats:
    """Prefix-cache counters, in tokens, over all admissions."""

    queries: int = 0
    hits: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


class BlockManager:
    """Allocates, shares and frees KV blocks; keeps the prefix-cache map."""

    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ConfigError(f"need num_blocks, block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks, least recently freed first. An OrderedDict so that a cache hit can
        # take a block out of the middle in O(1).
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[int, int] = {}  # block hash -> block id
        # request id -> how many leading blocks of its table are registered / were hits.
        self._num_registered: dict[str, int] = {}
        self.stats = PrefixCacheStats()

    # --- read-only views ------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks with no reference (cached or not): all can be handed out."""
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of the pool referenced by some request, in ``[0, 1]``."""
        return 1.0 - len(self._free) / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def prefix_cache_queries(self) -> int:
        return self.stats.queries

    @property
    def prefix_cache_hits(self) -> int:
        return self.stats.hits

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks that hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.block_size)

    # --- the API the scheduler calls -------------------------------------------------------

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """Longest chain of cached full blocks for the request's tokens.

        Capped to leave at least one token to compute (the step that computes it produces
        the logits to sample from), so hits cover at most ``num_tokens - 1`` tokens, whole
        blocks only. Returns ``(block ids, number of cached tokens)``; changes nothing.
        """
        if not self.enable_prefix_caching:
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        hashes = self._block_hashes(request, max_blocks)
        hits: list[int] = []
        for i in range(max_blocks):
            block_id = self._cached.get(hashes[i])
            if block_id is None:
                break
            hits.append(block_id)
        return hits, len(hits) * self.block_size

    def allocate_slots(
        self, request: Request, num_new_tokens: int, computed_blocks: Sequence[int] = ()
    ) -> bool:
        """Grow ``request.block_ids`` to hold the step's tokens; False (no change) if short.

        ``computed_blocks`` (prefix hits from :meth:`get_computed_blocks`) are only given at
        admission, when the table is empty; the caller then advances
        ``num_computed_tokens`` by ``len(computed_blocks) * block_size``.
        """
        B = self.block_size
        held = len(request.block_ids)
        if computed_blocks and (held or request.num_computed_tokens):
            raise KVCacheError(f"request {request.request_id}: prefix hits for a running request")
        if request.num_computed_tokens > held * B:
            raise KVCacheError(f"request {request.request_id}: block table misses computed tokens")
        # The block table after this call (B = block_size; hits only at admission, when
        # num_computed_tokens == 0 and held == 0):
        #
        #   block_ids  [ hit | hit | held | held (partial) | new | new ]
        #   tokens     [ 0 ........... computed ......)[ num_new_tokens ....)total
        #
        #   computed   = num_computed_tokens + len(computed_blocks) * B
        #   total      = computed + num_new_tokens
        #   new blocks = ceil(total / B) - len(computed_blocks) - held
        #
        # Token t lives in block_ids[t // B], slot t % B. Hit blocks are full, so the step's
        # first token lands in the private partial block or a new one: never a shared block.
        total = request.num_computed_tokens + len(computed_blocks) * B + num_new_tokens
        num_new_blocks = max(0, self.blocks_needed(total) - len(computed_blocks) - held)
        # Free hit blocks leave the free list too, so they count against it.
        num_free_hits = sum(1 for b in computed_blocks if self.blocks[b].ref_count == 0)
        if num_new_blocks + num_free_hits > len(self._free):
            return False
        if not held and self.enable_prefix_caching:
            self.stats.queries += request.num_tokens
            self.stats.hits += len(computed_blocks) * B
        for block_id in computed_blocks:  # take the hits first: allocating must not evict them
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1
        request.block_ids.extend(computed_blocks)
        if computed_blocks:
            self._num_registered[request.request_id] = len(computed_blocks)
        for _ in range(num_new_blocks):
            request.block_ids.append(self._allocate_block())
        return True

    def cache_full_blocks(self, request: Request) -> None:
        """Register the request's blocks that are now full of computed tokens.

        Call after ``num_computed_tokens`` advanced. If another block already holds the
        same prefix, this one stays unregistered (its twin serves future hits).
        """
        if not self.enable_prefix_caching:
            return
        num_full = min(request.num_computed_tokens // self.block_size, len(request.block_ids))
        start = self._num_registered.get(request.request_id, 0)
        if num_full <= start:
            return
        hashes = self._block_hashes(request, num_full)
        for i in range(start, num_full):
            block = self.blocks[request.block_ids[i]]
            if block.block_hash is None and hashes[i] not in self._cached:
                block.block_hash = hashes[i]
                self._cached[hashes[i]] = block.block_id
        self._num_registered[request.request_id] = num_full

    def free(self, request: Request) -> None:
        """Drop the request's references; blocks reaching 0 join the free list, tail first."""
        for block_id in reversed(request.block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
        request.block_ids = []
        self._num_registered.pop(request.request_id, None)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix. Only when no block is in use; returns whether it did."""
        if len(self._free) != self.num_blocks:
            return False
        for block in self.blocks:
            block.block_hash = None
        self._cached.clear()
        return True

    # --- internals ---------------------------------------------------------------------------

    def _allocate_block(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:  # evict: its old content is about to be overwritten
            del self._cached[block.block_hash]
            block.block_hash = None
        block.ref_count = 1
        return block_id

    def _block_hashes(self, request: Request, num_blocks: int) -> list[int]:
        """``request.block_hashes``, extended to cover at least ``num_blocks`` full blocks."""
        hashes = request.block_hashes
        tokens = request.all_token_ids
        B = self.block_size
        while len(hashes) < num_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block_tokens(parent, tokens[i * B : (i + 1) * B]))
        return hashes

    def check_invariants(self, requests: Iterable[Request] | None = None) -> None:
        """Raise :class:`KVCacheError` if the pool is inconsistent (for tests and debugging).

        With ``requests`` (every request holding blocks), reference counts must equal the
        number of tables holding each block.
        """
        for block in self.blocks:
            if block.ref_count < 0 or (block.ref_count == 0) != (block.block_id in self._free):
                raise KVCacheError(f"block {block.block_id}: ref {block.ref_count} vs free list")
            h = block.block_hash
            if h is not None and self._cached.get(h) != block.block_id:
                raise KVCacheError(f"block {block.block_id}: hash not in the cache map")
        if any(not 0 <= b < self.num_blocks for b in self._free):
            raise KVCacheError("free list holds unknown blocks")
        for block_hash, block_id in self._cached.items():
            if self.blocks[block_id].block_hash != block_hash:
                raise KVCacheError(f"cache map points at block {block_id} with another hash")
        if requests is None:
            return
        refs = [0] * self.num_blocks
        for request in requests:
            if len(set(request.block_ids)) != len(request.block_ids):
                raise KVCacheError(f"request {request.request_id} holds a block twice")
            for block_id in request.block_ids:
                refs[block_id] += 1
        for block, ref in zip(self.blocks, refs):
            if block.ref_count != ref:
                raise KVCacheError(f"block {block.block_id}: ref {block.ref_count}, held by {ref}")
            if ref > 1 and block.block_hash is None:
                raise KVCacheError(f"block {block.block_id} is shared but not a full cached block")
