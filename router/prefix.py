"""The prefix-block hash chain, as the engine's block manager computes it
(`engine.block_manager.hash_block`; a test checks they agree): block i's hash covers every
token before it, so one lookup per block finds the longest cached prefix on a worker."""

from __future__ import annotations

import struct
from collections.abc import Sequence

import xxhash


def block_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """Hashes of the full blocks of `token_ids`, in order."""
    out: list[int] = []
    parent: int | None = None
    for i in range(len(token_ids) // block_size):
        h = xxhash.xxh3_64()
        if parent is not None:
            h.update(parent.to_bytes(8, "little"))
        block = token_ids[i * block_size:(i + 1) * block_size]
        h.update(struct.pack(f"<{block_size}q", *block))
        parent = h.intdigest()
        out.append(parent)
    return out
