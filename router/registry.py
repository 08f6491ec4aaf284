"""The cluster's shared state in Redis: which workers exist, their load, and which prompt
prefixes their KV caches hold. Tensors never go here.

Keys (all under `pdserve:`):
- `pdserve:registry`      string: an id the first writer sets on a new (or flushed) Redis;
                          a reader that sees it change knows the registry lost what it held
                          (a restarted redis-server), not that the workers died;
- `pdserve:worker:<id>`   hash: a WorkerRecord, with a TTL; a worker that stops
                          heartbeating disappears when it expires;
- `pdserve:workers`       sorted set of worker ids by last heartbeat (discovery);
- `pdserve:prefix:<hash>` set of worker ids whose prefix cache holds that block (the block
                          hash chain of protocol.prefix), kept by the workers' heartbeats.

Writers (a worker's heartbeat, in deploy/) use a synchronous client; the router reads with
an asyncio client. Both come from `sync_client` / `async_client`: every call is bounded by
connect and socket timeouts, so a dead or hung Redis is an error in bounded time, never a
freeze. Readers never trust the sorted set alone: a worker whose hash expired is dead, and
is dropped from the set by the first reader to notice.

Errors: writers and `read_registry` raise `RegistryErrors` (callers decide how to carry
on); `prefix_hits` never raises: routing without prefix hits is still correct.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import redis
import redis.asyncio

from pdserve.protocol import WorkerRecord

log = logging.getLogger(__name__)
PREFIX = "pdserve:"
WORKERS = PREFIX + "workers"
REGISTRY_ID = PREFIX + "registry"
CONNECT_TIMEOUT_S = 1.0
SOCKET_TIMEOUT_S = 2.0
# what an unreachable, hung or restarting Redis raises (redis-py wraps most socket errors)
RegistryErrors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)


def worker_key(worker_id: str) -> str:
    return f"{PREFIX}worker:{worker_id}"


def prefix_key(block_hash: int) -> str:
    return f"{PREFIX}prefix:{block_hash:016x}"


def sync_client(url: str) -> redis.Redis:
    """A writer's client; each command fails within the timeouts when Redis is gone."""
    return redis.Redis.from_url(url, socket_connect_timeout=CONNECT_TIMEOUT_S,
                                socket_timeout=SOCKET_TIMEOUT_S)


def async_client(url: str) -> redis.asyncio.Redis:
    """A reader's client (the router's); same timeouts as `sync_client`."""
    return redis.asyncio.Redis.from_url(url, socket_connect_timeout=CONNECT_TIMEOUT_S,
                                        socket_timeout=SOCKET_TIMEOUT_S)


# -- writers (synchronous redis client) -------------------------------------------------------

def publish(client: redis.Redis, record: WorkerRecord, ttl_s: float) -> bool:
    """Register or refresh a worker; it expires `ttl_s` after its last heartbeat. True when
    the registry held no entry for it (its first beat, a new Redis, or an expired entry):
    the registry may then have lost this worker's prefix blocks too."""
    key = worker_key(record.worker_id)
    pipe = client.pipeline()
    pipe.exists(key)
    pipe.hset(key, mapping=record.to_fields())
    pipe.pexpire(key, int(ttl_s * 1000))
    pipe.zadd(WORKERS, {record.worker_id: record.heartbeat})
    pipe.set(REGISTRY_ID, uuid.uuid4().hex, nx=True)
    existed = pipe.execute()[0]
    return not existed


def unpublish(client: redis.Redis, worker_id: str) -> None:
    pipe = client.pipeline()
    pipe.delete(worker_key(worker_id))
    pipe.zrem(WORKERS, worker_id)
    pipe.execute()


def index_prefixes(client: redis.Redis, worker_id: str, added: Iterable[int],
                   removed: Iterable[int]) -> None:
    """Record blocks that entered and left a worker's prefix cache (idempotent)."""
    pipe = client.pipeline(transaction=False)
    for h in added:
        pipe.sadd(prefix_key(h), worker_id)
    for h in removed:
        pipe.srem(prefix_key(h), worker_id)
    pipe.execute()


# -- readers (redis.asyncio client) -----------------------------------------------------------

@dataclass(frozen=True)
class Registry:
    """What one read of the registry found: the live workers' records, and the id of the
    registry they were read from (None until a worker has written to this Redis)."""

    records: list[WorkerRecord]
    registry_id: str | None


async def read_registry(client: redis.asyncio.Redis) -> Registry:
    """The live workers and the registry's id; raises one of `RegistryErrors` when Redis
    cannot be read."""
    pipe = client.pipeline(transaction=False)
    pipe.get(REGISTRY_ID)
    pipe.zrange(WORKERS, 0, -1)
    raw_id, raw_ids = await pipe.execute()
    registry_id = raw_id.decode() if isinstance(raw_id, bytes) else raw_id
    ids = [i.decode() if isinstance(i, bytes) else i for i in raw_ids]
    if not ids:
        return Registry([], registry_id)
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
    return Registry(records, registry_id)


async def live_workers(client: redis.asyncio.Redis) -> list[WorkerRecord]:
    return (await read_registry(client)).records


async def prefix_hits(client: redis.asyncio.Redis, hashes: Sequence[int]) -> dict[str, int]:
    """Per worker: how many leading blocks of the chain `hashes` its cache holds. {} when
    Redis cannot be read: routing then ignores prefixes (the cluster view reports the
    outage once; this would say it on every request)."""
    if not hashes:
        return {}
    pipe = client.pipeline(transaction=False)
    for h in hashes:
        pipe.smembers(prefix_key(h))
    try:
        sets = await pipe.execute()
    except RegistryErrors as e:
        log.debug("no prefix hits: the registry cannot be read: %s", e)
        return {}
    holders = [{m.decode() if isinstance(m, bytes) else m for m in s} for s in sets]
    hits: dict[str, int] = {}
    alive = set(holders[0])
    for depth, members in enumerate(holders):
        alive &= members
        for w in alive:
            hits[w] = depth + 1
        if not alive:
            break
    return hits
