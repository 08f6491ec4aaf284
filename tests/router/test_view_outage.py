"""The router's cluster view on a real Redis that dies, hangs, is replaced by an empty one
or is flushed: the view keeps its last workers while it cannot read, gives them time to
re-register when the registry comes back empty, and only then drops a worker that never
did (its requests get `Gone`)."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
import redis

from pdserve.deploy.redis_server import RedisServer
from pdserve.protocol import WorkerRecord, WorkerRole
from pdserve.router.registry import async_client, index_prefixes, prefix_hits, publish
from pdserve.router.view import ClusterView, Gone

GRACE_S = 1.0


def record(wid: str, started: float = 1.0) -> WorkerRecord:
    return WorkerRecord(wid, WorkerRole.DECODE, "node-a", "", 16, 20, 20, 0, 0, 0, time.time(),
                        started)


def register(url: str, *records: WorkerRecord) -> None:
    with redis.Redis.from_url(url) as client:
        for r in records:
            publish(client, r, ttl_s=30)


async def until(predicate, timeout: float, what: str, poll_s: float = 0.05):
    end = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < end, f"timed out after {timeout}s waiting for {what}"
        await asyncio.sleep(poll_s)


@pytest.fixture()
def server():
    s = RedisServer()
    yield s
    s.stop()


def test_the_view_rides_out_a_dead_redis_and_an_empty_new_one(server):
    register(server.url, record("w0"), record("w1"))

    async def main():
        client = async_client(server.url)
        view = ClusterView(client, lambda r: object(), rejoin_grace_s=GRACE_S)
        try:
            await view.refresh()
            assert set(view.workers) == {"w0", "w1"}
            held = asyncio.Queue()
            view.workers["w1"].in_flight["t"] = held
            port = server.port
            server.kill()
            started = time.monotonic()
            await view.refresh()  # never raises: the last view stands
            assert view.unreachable_since is not None
            assert set(view.workers) == {"w0", "w1"} and held.empty()
            assert await prefix_hits(client, [1, 2]) == {}
            assert time.monotonic() - started < 10

            new = RedisServer(port=port, password=server.password)
            try:
                await view.refresh()  # readable, empty: the workers are re-registering
                assert view.unreachable_since is None
                assert set(view.workers) == {"w0", "w1"} and held.empty()
                register(new.url, record("w0"))  # w1 never comes back

                async def w1_dropped():
                    await view.refresh()
                    return "w1" not in view.workers
                await until(w1_dropped, 10, "w1 to be dropped after the grace")
                assert time.monotonic() - started >= GRACE_S
                assert set(view.workers) == {"w0"}
                assert held.get_nowait() == Gone("w1")
            finally:
                new.stop()
        finally:
            await client.aclose()

    asyncio.run(main())


def test_a_flushed_registry_gets_the_same_grace_and_a_restart_does_not(server):
    register(server.url, record("w0"), record("w1"))

    async def main():
        client = async_client(server.url)
        view = ClusterView(client, lambda r: object(), rejoin_grace_s=GRACE_S)
        try:
            await view.refresh()
            with redis.Redis.from_url(server.url) as sync:
                sync.flushall()  # no error on the way: only the registry's id tells
            await view.refresh()
            assert set(view.workers) == {"w0", "w1"}
            register(server.url, record("w0", started=2.0))  # w0 restarted meanwhile
            await view.refresh()
            assert set(view.workers) == {"w0", "w1"}
            assert view.workers["w0"].record.started == 2.0  # a new incarnation, at once

            async def w1_dropped():
                await view.refresh()
                return "w1" not in view.workers
            await until(w1_dropped, 10, "w1 to be dropped after the grace")
        finally:
            await client.aclose()

    asyncio.run(main())


def test_a_hung_redis_costs_a_refresh_bounded_time_and_no_worker(server):
    register(server.url, record("w0"))
    with redis.Redis.from_url(server.url) as sync:
        index_prefixes(sync, "w0", [1, 2], [])

    async def main():
        client = async_client(server.url)
        view = ClusterView(client, lambda r: object(), rejoin_grace_s=GRACE_S)
        try:
            await view.refresh()
            assert await prefix_hits(client, [1, 2]) == {"w0": 2}
            os.kill(server.pid, signal.SIGSTOP)
            try:
                started = time.monotonic()
                await view.refresh()
                assert await prefix_hits(client, [1, 2]) == {}
                assert time.monotonic() - started < 15  # two socket timeouts, not forever
                assert set(view.workers) == {"w0"} and view.unreachable_since is not None
            finally:
                os.kill(server.pid, signal.SIGCONT)
            await view.refresh()
            assert set(view.workers) == {"w0"} and view.unreachable_since is None
            assert await prefix_hits(client, [1, 2]) == {"w0": 2}
        finally:
            await client.aclose()

    asyncio.run(main())
