"""The fault-handling bounds are `pdserve serve` flags that reach the cluster's spec, and
the spec refuses bounds that are not positive."""

from __future__ import annotations

import pytest
from spec_capture import served_spec

from pdserve.deploy.spec import ClusterSpec


def test_serve_flags_reach_the_spec(monkeypatch):
    spec = served_spec(monkeypatch, "--worker-call-timeout", "1.5", "--heartbeat-ttl", "2.5",
                       "--router-stream-grace", "7")
    assert (spec.worker_call_timeout_s, spec.heartbeat_ttl_s, spec.router_stream_grace_s) == (
        1.5, 2.5, 7.0)
    assert spec.worker_config("d", spec.roles()[-1][1]).stream_grace_s == 7.0


@pytest.mark.parametrize("field", ["worker_call_timeout_s", "heartbeat_ttl_s",
                                   "router_stream_grace_s"])
def test_bounds_must_be_positive(field):
    with pytest.raises(ValueError, match=field):
        ClusterSpec(**{field: 0.0})
