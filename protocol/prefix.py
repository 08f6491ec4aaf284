"""The prefix-block hash chain: block i's hash covers every token before it, so equal hashes
mean equal prefixes, and one lookup per block finds the longest cached prefix on a worker.
The engine's block manager registers blocks under these hashes; the router looks them up
in the cluster's prefix index."""

from __future__ import annotations

import sys
from array import array
from collections.abc import Sequence

import xxhash


def hash_block(parent_hash: int | None, token_ids: Sequence[int]) -> int:
    """Chain hash of one full block of token ids, given the hash of the block before it."""
    h = xxhash.xxh3_64()
    if parent_hash is not None:
        h.update(parent_hash.to_bytes(8, "little"))
    tokens = array("q", token_ids)
    if sys.byteorder != "little":  # the hash is the same on every machine of a cluster
        tokens.byteswap()
    h.update(tokens.tobytes())
    return h.intdigest()


def block_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """Hashes of the full blocks of `token_ids`, in order."""
    out: list[int] = []
    parent: int | None = None
    for i in range(len(token_ids) // block_size):
        parent = hash_block(parent, token_ids[i * block_size:(i + 1) * block_size])
        out.append(parent)
    return out
