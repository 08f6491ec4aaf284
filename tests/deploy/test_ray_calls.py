"""RayCalls times out like ThreadCalls (deploy.handles, Timeouts): an actor that does not
answer makes an order raise WorkerGone and an abort return, both within the timeout; a
prompt answer passes through."""

from __future__ import annotations

import asyncio
import time

import pytest
import ray

from pdserve.deploy.handles import WorkerHandle
from pdserve.deploy.ray_actors import RayCalls
from pdserve.router.handles import WorkerGone


@ray.remote(max_concurrency=4)
class Sleepy:
    """reserve(seconds) answers after sleeping that long; abort never in time."""

    def reserve(self, seconds):
        time.sleep(seconds)
        return "tcp://127.0.0.1:2"

    def abort(self, transfer_id):
        time.sleep(30)


@pytest.fixture(scope="module")
def actor():
    # "local": a Ray instance of its own, never one another process started on this machine
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield Sleepy.remote()
    ray.shutdown()


def test_an_actor_that_does_not_answer_is_gone_within_the_timeout(actor):
    handle = WorkerHandle(actor, "decode-0", RayCalls(timeout_s=1.0))

    async def scenario():
        assert await handle.reserve(0.0) == "tcp://127.0.0.1:2"
        started = time.monotonic()
        with pytest.raises(WorkerGone, match="decode-0: no answer within 1s"):
            await handle.reserve(60.0)
        await handle.abort("t")  # returns, never raises
        return time.monotonic() - started

    assert asyncio.run(scenario()) < 20  # two timeouts of 1 s, with a generous margin
