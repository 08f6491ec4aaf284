"""A worker's heartbeat against a real Redis that dies, hangs and comes back: the thread
keeps trying (bounded by the client's timeouts), and once a beat lands again the registry
holds the worker's record and every block its prefix cache holds, whatever happened to
the index meanwhile."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import redis
from helpers import wait_for

from pdserve.deploy.heartbeat import Heartbeat, HeartbeatConfig
from pdserve.deploy.redis_server import RedisServer
from pdserve.engine.engine import EngineStats
from pdserve.protocol import WorkerRecord, WorkerRole
from pdserve.router.registry import prefix_key, worker_key
from pdserve.worker.loop import LoadReport


class CacheWorker:
    """What a heartbeat reads of a worker: a fixed load, and a prefix cache the test fills
    and evicts, drained as deltas the way the engine loop hands them out."""

    def __init__(self):
        self._lock = threading.Lock()
        self._entered: set[int] = set()
        self._left: set[int] = set()

    def kv_endpoint(self) -> str:
        return "tcp://127.0.0.1:1"

    def load(self) -> LoadReport:
        return LoadReport(EngineStats(64, 64, 0, 0, 0, 0, 0, 0, 0), 0, time.time())

    def drain_prefix_events(self) -> tuple[list[int], list[int]]:
        with self._lock:
            entered, left = sorted(self._entered), sorted(self._left)
            self._entered, self._left = set(), set()
        return entered, left

    def cache(self, *hashes: int) -> None:
        with self._lock:
            self._entered.update(hashes)
            self._left.difference_update(hashes)

    def evict(self, *hashes: int) -> None:
        with self._lock:
            self._left.update(hashes)
            self._entered.difference_update(hashes)


CONFIG = dict(node="node-a", block_size=16, interval_s=0.1, ttl_s=1.0)


def indexed(client: redis.Redis, worker_id: str, hashes) -> set[int]:
    """Which of `hashes` the prefix index lists `worker_id` under."""
    return {h for h in hashes if client.sismember(prefix_key(h), worker_id)}


def record(client: redis.Redis, worker_id: str) -> WorkerRecord | None:
    raw = client.hgetall(worker_key(worker_id))
    return WorkerRecord.from_fields(raw) if raw else None


@pytest.fixture()
def server():
    s = RedisServer()
    yield s
    s.stop()


def test_a_new_redis_gets_the_record_and_every_cached_block_back(server):
    worker = CacheWorker()
    hb = Heartbeat(HeartbeatConfig(server.url, **CONFIG), worker, "w0", WorkerRole.DECODE)
    client = redis.Redis.from_url(server.url)
    try:
        worker.cache(1, 2, 3)
        wait_for(lambda: indexed(client, "w0", range(10)) == {1, 2, 3}, 10, "the first index")
        port = server.port
        server.kill()
        worker.cache(4)  # the cache moves on while Redis is away
        worker.evict(2)
        wait_for(lambda: hb.failures >= 3, 10, "beats to fail")
        assert hb.is_alive

        # brand new and empty, on the same address (with the same password)
        server = RedisServer(port=port, password=server.password)
        client = redis.Redis.from_url(server.url)
        wait_for(lambda: record(client, "w0"), 10, "the worker to register again")
        wait_for(lambda: indexed(client, "w0", range(10)) == {1, 3, 4}, 10,
                 "the whole cache to be indexed again")
        first = record(client, "w0").heartbeat
        wait_for(lambda: record(client, "w0").heartbeat > first, 10, "the next beats")
        assert hb.is_alive and hb.failures == 0
        assert hb.cached == {1, 3, 4}
        hb.stop()
        assert record(client, "w0") is None  # an orderly stop unregisters at once
    finally:
        if hb.is_alive:
            hb.stop()
        client.close()
        server.stop()


def test_a_hung_redis_costs_bounded_beats_and_the_index_catches_up(server):
    """SIGSTOP for longer than the TTL: beats time out instead of hanging; afterwards the
    expired record is back and blocks evicted meanwhile leave the (surviving) index."""
    worker = CacheWorker()
    hb = Heartbeat(HeartbeatConfig(server.url, **CONFIG), worker, "w0", WorkerRole.PREFILL)
    client = redis.Redis.from_url(server.url)
    try:
        worker.cache(1, 2)
        wait_for(lambda: indexed(client, "w0", range(10)) == {1, 2}, 10, "the first index")
        os.kill(server.pid, signal.SIGSTOP)
        try:
            worker.evict(1)
            worker.cache(5)
            # each beat gives up within the socket timeout (2 s), so failures pile up
            wait_for(lambda: hb.failures >= 2, 20, "beats to time out")
            assert hb.is_alive
        finally:
            os.kill(server.pid, signal.SIGCONT)
        wait_for(lambda: hb.failures == 0, 10, "a beat to land")
        wait_for(lambda: indexed(client, "w0", range(10)) == {2, 5}, 10, "the index to catch up")
        assert record(client, "w0") is not None
    finally:
        hb.stop()
        client.close()


def test_a_worker_started_while_redis_is_away_registers_when_it_answers(server):
    port = server.port
    server.kill()
    worker = CacheWorker()
    worker.cache(7)
    hb = Heartbeat(HeartbeatConfig(server.url, **CONFIG), worker, "w0", WorkerRole.DECODE)
    try:
        assert hb.is_alive and hb.failures >= 1
        server = RedisServer(port=port, password=server.password)
        client = redis.Redis.from_url(server.url)
        wait_for(lambda: record(client, "w0"), 10, "the worker to register")
        wait_for(lambda: indexed(client, "w0", range(10)) == {7}, 10, "its cache indexed")
        client.close()
    finally:
        hb.stop()
        server.stop()
