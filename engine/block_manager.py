"""Paged KV block bookkeeping: allocation, reference counts and the prefix cache.

Pure Python, no tensors. A block is *free* when its reference count is 0. A free block may
still hold the KV of a full block of tokens whose hash is registered: a later request with
the same prefix takes it back (`acquire`) instead of recomputing it. Free blocks are reused
in least-recently-freed order, so cached prefixes survive as long as memory allows.

Contract with the scheduler:
- `allocate` and `acquire` each add one reference per block to the caller; the caller gives
  every reference back exactly once with `free`.
- `register` is called only after the block's KV is fully computed, so a block found by
  `match_prefix` always holds valid KV.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from pdserve.protocol import hash_block


class NoFreeBlocksError(RuntimeError):
    """More blocks were asked for than are free. Callers check `num_free_blocks` first."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        # block id -> None, oldest-freed first; only blocks with ref count 0.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._hash_to_block: dict[int, int] = {}
        self._block_hash: dict[int, int] = {}
        self._block_tokens: dict[int, tuple[int, ...]] = {}
        # (entered, left) the prefix cache since the last drain; None until first asked
        self._events: tuple[set[int], set[int]] | None = None

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match_prefix(
        self, token_ids: Sequence[int], max_blocks: int
    ) -> tuple[list[int], list[int]]:
        """Longest run of leading full blocks of `token_ids` whose KV is cached.

        Looks at no more than `max_blocks` blocks. Returns `(block_ids, hashes)`; the blocks
        are not referenced yet (pass them to `acquire`). Changes no state.
        """
        if not self.enable_prefix_caching:
            return [], []
        block_ids: list[int] = []
        hashes: list[int] = []
        parent: int | None = None
        bs = self.block_size
        n = min(max_blocks, len(token_ids) // bs)
        for i in range(n):
            tokens = tuple(token_ids[i * bs : (i + 1) * bs])
            h = hash_block(parent, tokens)
            block = self._hash_to_block.get(h)
            if block is None or self._block_tokens[block] != tokens:
                break
            block_ids.append(block)
            hashes.append(h)
            parent = h
        return block_ids, hashes

    def num_free_after_acquire(self, block_ids: Sequence[int]) -> int:
        """Free blocks left once `block_ids` (cache hits) are referenced."""
        return self.num_free_blocks - sum(1 for b in block_ids if self._ref_counts[b] == 0)

    def acquire(self, block_ids: Sequence[int]) -> None:
        """Take a reference on blocks that hold cached KV (from `match_prefix`)."""
        for b in block_ids:
            if self._ref_counts[b] == 0:
                del self._free[b]
            self._ref_counts[b] += 1

    def allocate(self, num_blocks: int) -> list[int]:
        """Take `num_blocks` fresh blocks, evicting the least recently freed cached ones."""
        if num_blocks > len(self._free):
            raise NoFreeBlocksError(f"asked for {num_blocks} blocks, {len(self._free)} free")
        out = []
        for _ in range(num_blocks):
            b, _ = self._free.popitem(last=False)
            self._forget(b)
            self._ref_counts[b] = 1
            out.append(b)
        return out

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference per block. Freed in reverse so a sequence's tail is evicted
        before its head, which other requests are more likely to share."""
        for b in reversed(block_ids):
            if self._ref_counts[b] <= 0:
                raise RuntimeError(f"block {b} freed more often than it was referenced")
            self._ref_counts[b] -= 1
            if self._ref_counts[b] == 0:
                self._free[b] = None

    def register(self, block_id: int, block_hash: int, token_ids: Sequence[int]) -> None:
        """Publish a full, computed block to the prefix cache (first writer wins)."""
        if not self.enable_prefix_caching or block_hash in self._hash_to_block:
            return
        self._forget(block_id)
        self._hash_to_block[block_hash] = block_id
        if self._events is not None:
            self._events[0].add(block_hash)
            self._events[1].discard(block_hash)
        self._block_hash[block_id] = block_hash
        self._block_tokens[block_id] = tuple(token_ids)

    def drain_prefix_events(self) -> tuple[list[int], list[int]]:
        """Block hashes that entered and left the prefix cache since the last call (what a
        cluster-wide prefix index needs). Recording starts with the first call, so an engine
        nobody asks keeps no log."""
        if self._events is None:
            self._events = (set(), set())
            return list(self._hash_to_block), []
        entered, left = self._events
        self._events = (set(), set())
        return sorted(entered), sorted(left)

    def reset_prefix_cache(self) -> None:
        if self._events is not None:
            self._events[1].update(self._hash_to_block)
            self._events[0].clear()
        self._hash_to_block.clear()
        self._block_hash.clear()
        self._block_tokens.clear()

    def _forget(self, block_id: int) -> None:
        h = self._block_hash.pop(block_id, None)
        if h is not None:
            del self._hash_to_block[h]
            del self._block_tokens[block_id]
            if self._events is not None:
                self._events[1].add(h)
                self._events[0].discard(h)
