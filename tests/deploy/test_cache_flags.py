"""`pdserve serve --[no-]enable-prefix-caching` reaches every worker's engine (vLLM's flag:
on by default)."""

from __future__ import annotations

import pytest

from pdserve.deploy import local_cluster
from pdserve.deploy.cli import main


class Captured(Exception):
    pass


@pytest.mark.parametrize(("flags", "enabled"), [([], True),
                                                (["--enable-prefix-caching"], True),
                                                (["--no-enable-prefix-caching"], False)])
def test_prefix_caching_flag_reaches_every_workers_cache(monkeypatch, flags, enabled):
    specs = []

    def capture(spec, **kw):
        specs.append(spec)
        raise Captured

    monkeypatch.setattr(local_cluster, "LocalCluster", capture)
    with pytest.raises(Captured):
        main(["serve", "--no-ray", "--prefill", "1", "--decode", "1", "--adaptive", "2",
              *flags])
    (spec,) = specs
    assert spec.enable_prefix_caching is enabled
    for worker_id, role in spec.roles():
        cache = spec.worker_config(worker_id, role).engine.cache
        assert cache.enable_prefix_caching is enabled
