"""Fixtures of the KV transport tests."""

from __future__ import annotations

import pytest
import torch
from kv_helpers import caches


@pytest.fixture
def p_cache():
    """The prefill side's K and V caches, filled: 32 blocks of 4 tokens."""
    torch.manual_seed(0)
    return caches(32, 4, fill=True)
