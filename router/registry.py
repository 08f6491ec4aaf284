"""The cluster's shared state in Redis: which workers exist, their load, and which prompt
prefixes their KV caches hold. Tensors never go here.

Keys (all under `pdserve:`):
- `pdserve:worker:<id>`   hash: a WorkerRecord, with a TTL; a worker that stops
                          heartbeating disappears when it expires;
- `pdserve:workers`       sorted set of worker ids by last heartbeat (discovery);
- `pdserve:prefix:<hash>` set of worker ids whose prefix cache holds that block (the block
                          hash chain of protocol.prefix), kept by the workers' heartbeats.

Writers (a worker's heartbeat, in deploy/) use a synchronous client; the router reads with
an asyncio client. Readers never trust the sorted set alone: a worker whose hash expired is
dead, and is dropped from the set by the first reader to notice.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

from pdserve.protocol import WorkerRecord

log = logging.getLogger(__name__)
PREFIX = "pdserve:"
WORKERS = PREFIX + "workers"


def worker_key(worker_id: str) -> str:
    return f"{PREFIX}worker:{worker_id}"


def prefix_key(block_hash: int) -> str:
    return f"{PREFIX}prefix:{block_hash:016x}"


# -- writers (synchronous redis client) -------------------------------------------------------

def publish(client, record: WorkerRecord, ttl_s: float) -> None:
    """Register or refresh a worker; it expires `ttl_s` after its last heartbeat."""
    pipe = client.pipeline()
    pipe.hset(worker_key(record.worker_id), mapping=record.to_fields())
    pipe.pexpire(worker_key(record.worker_id), int(ttl_s * 1000))
    pipe.zadd(WORKERS, {record.worker_id: record.heartbeat})
    pipe.execute()


def unpublish(client, worker_id: str) -> None:
    pipe = client.pipeline()
    pipe.delete(worker_key(worker_id))
    pipe.zrem(WORKERS, worker_id)
    pipe.execute()


def index_prefixes(client, worker_id: str, added: Iterable[int], removed: Iterable[int]) -> None:
    """Record blocks that entered and left a worker's prefix cache."""
    pipe = client.pipeline()
    for h in added:
        pipe.sadd(prefix_key(h), worker_id)
    for h in removed:
        pipe.srem(prefix_key(h), worker_id)
    pipe.execute()


# -- readers (redis.asyncio client) -----------------------------------------------------------

async def live_workers(client) -> list[WorkerRecord]:
    ids = [i.decode() if isinstance(i, bytes) else i for i in await client.zrange(WORKERS, 0, -1)]
    if not ids:
        return []
    pipe = client.pipeline()
    for worker_id in ids:
        pipe.hgetall(worker_key(worker_id))
    records, dead = [], []
    for worker_id, raw in zip(ids, await pipe.execute(), strict=True):
        if not raw:
            dead.append(worker_id)
            continue
        try:
            records.append(WorkerRecord.from_fields(raw))
        except ValueError as e:  # not a record a worker of this version wrote: skip it
            log.error("ignoring registry entry %s: %s", worker_id, e)
    if dead:
        await client.zrem(WORKERS, *dead)
    return records


async def prefix_hits(client, hashes: Sequence[int]) -> dict[str, int]:
    """Per worker: how many leading blocks of the chain `hashes` its cache holds."""
    if not hashes:
        return {}
    pipe = client.pipeline()
    for h in hashes:
        pipe.smembers(prefix_key(h))
    holders = [{m.decode() if isinstance(m, bytes) else m for m in s}
               for s in await pipe.execute()]
    hits: dict[str, int] = {}
    alive = set(holders[0])
    for depth, members in enumerate(holders):
        alive &= members
        for w in alive:
            hits[w] = depth + 1
        if not alive:
            break
    return hits
