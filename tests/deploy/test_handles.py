"""The handles' error contract (router.handles): a full decode worker is NoRoom, a bad order
a ValueError, an unreachable or closed worker WorkerGone, and abort never raises for a dead
worker."""

from __future__ import annotations

import asyncio

import pytest

from pdserve.deploy.handles import WorkerHandle
from pdserve.engine import NoFreeBlocksError
from pdserve.protocol import DecodeOrder, PrefillOrder, SamplingParams
from pdserve.router.handles import NoRoom, WorkerGone

ORDER = DecodeOrder("t", (1, 2, 3), SamplingParams(max_tokens=2), "tcp://127.0.0.1:1", 5.0)


class Raising:
    """A worker whose every call raises `error` (what a proxy to a dead process does)."""

    def __init__(self, error: BaseException):
        self.error = error

    def reserve(self, job):
        raise self.error

    def generate(self, job):
        raise self.error

    def submit(self, job):
        raise self.error

    def abort(self, transfer_id):
        raise self.error


@pytest.mark.parametrize("error, expected", [
    (NoFreeBlocksError("asked for 3 blocks, 1 free"), NoRoom),
    (ValueError("token id 99999 is outside the vocabulary"), ValueError),
    (EOFError(), WorkerGone),
    (ConnectionRefusedError(), WorkerGone),
    (RuntimeError("engine loop closed"), WorkerGone),
])
def test_worker_errors_become_the_routers(error, expected):
    handle = WorkerHandle(Raising(error), "decode-0")
    with pytest.raises(expected):
        asyncio.run(handle.reserve(ORDER))
    with pytest.raises(expected):
        asyncio.run(handle.generate(ORDER))


def test_abort_of_a_dead_worker_does_not_raise_and_submit_reports_it_gone():
    dead = Raising(EOFError())
    asyncio.run(WorkerHandle(dead, "decode-0").abort("t"))
    asyncio.run(WorkerHandle(dead, "prefill-0").abort("t"))
    with pytest.raises(WorkerGone, match="prefill-0"):
        asyncio.run(WorkerHandle(dead, "prefill-0").submit(
            PrefillOrder("t", (1, 2), SamplingParams(), "tcp://127.0.0.1:1",
                         "tcp://127.0.0.1:2")))
