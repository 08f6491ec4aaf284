"""The Redis registry on a real Redis server (the embedded one): registration with TTLs,
discovery dropping expired workers, and the prefix index."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis
import redis.asyncio
from helpers import wait_for

from pdserve.deploy.redis_server import RedisServer
from pdserve.protocol import WorkerRecord, WorkerRole
from pdserve.router.registry import (
    WORKERS,
    index_prefixes,
    live_workers,
    prefix_hits,
    publish,
    unpublish,
)


@pytest.fixture(scope="module")
def server():
    s = RedisServer()
    yield s
    s.stop()


@pytest.fixture()
def client(server):
    c = redis.Redis.from_url(server.url)
    c.flushall()
    yield c
    c.close()


def record(wid, role=WorkerRole.DECODE, free=10):
    return WorkerRecord(wid, role, "node-a", "tcp://127.0.0.1:1", 16, 20, free, 1, 0, 0,
                        time.time(), 1.0)


def read(server, fn, *args):
    async def run():
        c = redis.asyncio.Redis.from_url(server.url)
        try:
            return await fn(c, *args)
        finally:
            await c.aclose()
    return asyncio.run(run())


def test_workers_register_refresh_and_expire(server, client):
    publish(client, record("d0"), ttl_s=0.3)
    publish(client, record("p0", WorkerRole.PREFILL), ttl_s=30)
    assert {r.worker_id for r in read(server, live_workers)} == {"d0", "p0"}
    publish(client, record("d0", free=3), ttl_s=0.3)
    assert [r.free_blocks for r in read(server, live_workers) if r.worker_id == "d0"] == [3]
    # d0 stops heartbeating: its entry expires
    wait_for(lambda: [r.worker_id for r in read(server, live_workers)] == ["p0"], 5,
             "d0's entry to expire")
    assert client.zrange(WORKERS, 0, -1) == [b"p0"]  # the reader cleaned up
    unpublish(client, "p0")
    assert read(server, live_workers) == []
    assert all(k.startswith(b"pdserve:") for k in client.keys("*"))


def test_prefix_index_counts_leading_blocks_per_worker(server, client):
    index_prefixes(client, "a", [1, 2, 3], [])
    index_prefixes(client, "b", [1, 3], [])
    assert read(server, prefix_hits, [1, 2, 3]) == {"a": 3, "b": 1}
    index_prefixes(client, "a", [], [2])
    assert read(server, prefix_hits, [1, 2, 3]) == {"a": 1, "b": 1}
    assert read(server, prefix_hits, [9]) == {}


def test_a_record_round_trips_and_a_foreign_entry_is_skipped(server, client):
    r = record("d0")
    assert WorkerRecord.from_fields(r.to_fields()) == r
    assert WorkerRecord.from_fields({k.encode(): v.encode()
                                     for k, v in r.to_fields().items()}) == r
    publish(client, r, ttl_s=30)
    client.hset("pdserve:worker:junk", mapping={"worker_id": "junk", "role": "sideways"})
    client.zadd(WORKERS, {"junk": time.time()})
    assert [w.worker_id for w in read(server, live_workers)] == ["d0"]
