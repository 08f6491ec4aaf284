"""Routing policies: pure functions of the workers' load, each unit-tested.

Loads come from the workers' heartbeats (a little stale); `in_flight` is this router's own
count of requests it has on a worker, which is current.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerLoad:
    worker_id: str
    free_blocks: int
    total_blocks: int
    block_size: int
    running: int
    waiting: int
    queued_prefill_tokens: int
    in_flight: int = 0


class Policy(enum.Enum):
    LOAD = "load"  # least loaded, prefix-aware
    ROUND_ROBIN = "round_robin"


class Hint(enum.Enum):
    AUTO = 0
    ALWAYS = 1
    NEVER = 2


def should_disaggregate(hint: Hint, num_prompt_tokens: int, threshold: int,
                        have_prefill_workers: bool) -> bool:
    """`never`, or a prompt under the threshold with `auto`, prefills where it decodes: a
    short prefill costs less than the transfer's fixed overhead (bench/README.md, TTFT)."""
    if hint is Hint.NEVER or not have_prefill_workers:
        return False
    return hint is Hint.ALWAYS or num_prompt_tokens >= threshold


def decode_fits(w: WorkerLoad, num_prompt_tokens: int, max_in_flight: int) -> bool:
    """A free slot and room for the prompt's blocks (and its first token's)."""
    return (w.in_flight < max_in_flight
            and -(-(num_prompt_tokens + 1) // w.block_size) <= w.free_blocks)


def decode_rank(w: WorkerLoad) -> tuple[int, int, str]:
    """choose_decode's order: the smallest running batch (heartbeat + this router's own
    requests) first, ties to the most free blocks."""
    return w.running + w.waiting + w.in_flight, -w.free_blocks, w.worker_id


def prefill_rank(w: WorkerLoad, num_prompt_tokens: int,
                 cached_blocks: Mapping[str, int]) -> tuple[int, str]:
    """choose_prefill's order: queued prefill tokens plus the prompt's tokens the worker's
    prefix cache does not hold."""
    hit = cached_blocks.get(w.worker_id, 0) * w.block_size
    return w.queued_prefill_tokens + max(num_prompt_tokens - hit, 1), w.worker_id


def choose_decode(workers: Sequence[WorkerLoad], num_prompt_tokens: int,
                  max_in_flight: int) -> WorkerLoad | None:
    """The first worker in `decode_rank` order that `decode_fits`; None when none does."""
    fits = [w for w in workers if decode_fits(w, num_prompt_tokens, max_in_flight)]
    return min(fits, key=decode_rank, default=None)


def choose_prefill(workers: Sequence[WorkerLoad], num_prompt_tokens: int,
                   cached_blocks: Mapping[str, int], max_in_flight: int) -> WorkerLoad | None:
    """The worker that would finish this prompt first (`prefill_rank`) among those with a
    free slot."""
    free = [w for w in workers if w.in_flight < max_in_flight]
    return min(free, key=lambda w: prefill_rank(w, num_prompt_tokens, cached_blocks),
               default=None)


def round_robin(workers: Sequence[WorkerLoad], turn: int,
                max_in_flight: int) -> WorkerLoad | None:
    """The `turn`-th worker with a free slot, cyclically (the baseline policy)."""
    free = sorted((w for w in workers if w.in_flight < max_in_flight), key=lambda w: w.worker_id)
    return free[turn % len(free)] if free else None
