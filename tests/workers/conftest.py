"""Fixtures of the worker tests."""

from __future__ import annotations

import pytest

from pdserve.bench.stream_collector import StreamCollector


@pytest.fixture(scope="module")
def collector():
    """The router's stream endpoint, shared by a module's tests."""
    c = StreamCollector()
    yield c
    assert not c.errors, c.errors
    c.close()


@pytest.fixture(scope="module")
def prefill(procs):
    """The prefill worker of a module whose `procs` spawns (prefill, decode)."""
    return procs[0].worker


@pytest.fixture(scope="module")
def decode(procs):
    """The decode worker of a module whose `procs` spawns (prefill, decode)."""
    return procs[1].worker
