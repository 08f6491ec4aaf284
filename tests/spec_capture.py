"""The ClusterSpec a `pdserve serve --no-ray ...` command line builds, captured where the
local cluster would start (nothing starts)."""

from __future__ import annotations

import pytest

from pdserve.deploy import local_cluster
from pdserve.deploy.cli import main
from pdserve.deploy.spec import ClusterSpec


class _Captured(Exception):
    pass


def served_spec(monkeypatch, *argv: str) -> ClusterSpec:
    specs = []

    def capture(spec, **kw):
        specs.append(spec)
        raise _Captured

    monkeypatch.setattr(local_cluster, "LocalCluster", capture)
    with pytest.raises(_Captured):
        main(["serve", "--no-ray", *argv])
    (spec,) = specs
    return spec
