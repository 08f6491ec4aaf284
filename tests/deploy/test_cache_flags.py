"""`pdserve serve --[no-]enable-prefix-caching` (vLLM's flag: on by default) and
`--prefill-pack-tokens` (by default 256 on a CPU, none on a GPU) reach the workers' engines."""

from __future__ import annotations

import pytest
from spec_capture import served_spec

from pdserve.deploy.spec import ClusterSpec
from pdserve.protocol import WorkerRole


@pytest.mark.parametrize(("flags", "enabled"), [([], True),
                                                (["--enable-prefix-caching"], True),
                                                (["--no-enable-prefix-caching"], False)])
def test_prefix_caching_flag_reaches_every_workers_cache(monkeypatch, flags, enabled):
    spec = served_spec(monkeypatch, "--prefill", "1", "--decode", "1", "--adaptive", "2",
                       *flags)
    assert spec.enable_prefix_caching is enabled
    for worker_id, role in spec.roles():
        cache = spec.worker_config(worker_id, role).engine.cache
        assert cache.enable_prefix_caching is enabled


@pytest.mark.parametrize(("flags", "cpu", "gpu"), [([], 256, None),
                                                   (["--prefill-pack-tokens", "64"], 64, 64)])
def test_prefill_pack_limit_defaults_by_device_and_reaches_the_engine(monkeypatch, flags, cpu,
                                                                      gpu):
    spec = served_spec(monkeypatch, *flags)
    assert (spec.pack_tokens("cpu"), spec.pack_tokens("cuda:0")) == (cpu, gpu)
    scheduler = spec.worker_config("prefill-0", WorkerRole.PREFILL).engine.scheduler
    assert scheduler.prefill_pack_tokens == cpu  # these tests run on a CPU
    with pytest.raises(ValueError, match="prefill_pack_tokens"):
        ClusterSpec(prefill_pack_tokens=0)
