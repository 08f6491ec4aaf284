"""Fixtures of the worker tests."""

from __future__ import annotations

import pytest
from pdserve.deploy.driver import StreamCollector


@pytest.fixture(scope="module")
def collector():
    """The router's token-stream endpoint, shared by a module's tests."""
    c = StreamCollector()
    yield c
    c.close()
