"""Warm-up requests are never among the measured ones: no warm-up prompt equals, prefixes or
is prefixed by a measured prompt, and none shares a prefix beyond what the measured set
itself shares, in the load generator (random and trace datasets) and in the sweep."""

from __future__ import annotations

import argparse
import asyncio

import pytest
from bench_recorder import Recorder

from pdserve.bench import serve_bench, sweep
from pdserve.bench.backends import Backend
from pdserve.bench.metrics import Slo
from pdserve.bench.workload import Sample, random_dataset, warmup_samples


def common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def assert_apart(warmup: list[Sample], measured: list[Sample], shared: int = 0) -> None:
    assert warmup and measured
    for w in warmup:
        for m in measured:
            assert w.prompt != m.prompt, "a warm-up prompt is measured"
            assert m.prompt[:len(w.prompt)] != w.prompt, "a warm-up prompt prefixes a measured one"
            assert w.prompt[:len(m.prompt)] != m.prompt, "a measured prompt prefixes a warm-up"
            assert common_prefix(w.prompt, m.prompt) <= shared, "a warm-up shares a prefix"


def _bench_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    serve_bench.add_arguments(ap)
    return ap.parse_args(["--backend", "openai", *argv])


@pytest.mark.parametrize("argv, shared", [
    (["--num-prompts", "16", "--input-len", "64", "--output-len", "4", "--warmup", "3"], 0),
    (["--num-prompts", "16", "--input-len", "16", "--prefix-len", "32", "--range-ratio", "0.5",
      "--warmup", "2"], 32),
    # Mooncake requests share 512 x 0.02 = 10-token prefix blocks among themselves
    (["--dataset", "mooncake", "--num-prompts", "40", "--length-scale", "0.02",
      "--time-scale", "1e-5", "--warmup", "3"], 0),
    (["--dataset", "azure-code", "--num-prompts", "20", "--length-scale", "0.01",
      "--time-scale", "1e-5", "--warmup", "2"], 0),
], ids=["random", "random-shared-prefix", "mooncake", "azure-code"])
def test_load_generator_warms_up_with_prompts_it_does_not_measure(monkeypatch, argv, shared):
    args = _bench_args(argv)
    recorder = Recorder()
    monkeypatch.setattr(serve_bench, "make_backend", lambda _args: recorder)
    result = asyncio.run(serve_bench.bench(args))
    warmup, measured = recorder.sent[:args.warmup], recorder.sent[args.warmup:]
    assert sorted(m.prompt for m in measured) == sorted(
        s.prompt for s in serve_bench.build_samples(args))
    assert result["num_prompts"] == len(measured) and result["warmup_requests"] == args.warmup
    assert_apart(warmup, measured, shared)
    assert all(w.output_len <= 4 for w in warmup)


def test_sweep_warms_up_apart_from_every_run_and_from_calibration():
    w = sweep.Workload(**{**sweep.WORKLOADS["chat"].__dict__, "rates": (1e6, 2e6)})

    class FakeServer:
        deployment = sweep.DEPLOYMENTS["1p1d"]

        def __init__(self):
            self.recorder = Recorder()

        def backend(self) -> Backend:
            return self.recorder

    server = FakeServer()
    asyncio.run(sweep.calibrate(server, w, n=4))
    assert_apart(server.recorder.sent[:1], server.recorder.sent[1:])
    server = FakeServer()
    runs = asyncio.run(sweep.sweep_deployment(server, w, Slo(1e3, 1e3), 4, seeds=[0, 1]))
    assert len(runs) == 4
    sent = server.recorder.sent
    assert len(sent) == sweep.WARMUP + 4 * 4
    assert_apart(sent[:sweep.WARMUP], sent[sweep.WARMUP:])


def test_warmup_samples_take_the_measured_shapes_and_avoid_their_first_own_token():
    measured = random_dataset(8, 20, 10, range_ratio=0.5, prefix_len=5, seed=1)
    warm = warmup_samples(measured, 3, shared_prefix=5, seed=1)
    assert [len(w.prompt) for w in warm] == [len(m.prompt) for m in measured[:3]]
    assert all(w.prompt[:5] == measured[0].prompt[:5] and w.arrival is None for w in warm)
    assert warm == warmup_samples(measured, 3, shared_prefix=5, seed=1)
    assert_apart(warm, measured, shared=5)
    # a vocabulary of two ids, one taken by the measured prompts: the warm-up takes the other
    taken = [Sample((1000, 1001), 4), Sample((1000,), 4)]
    assert {w.prompt[0] for w in warmup_samples(taken, 5, vocab=1002)} == {1001}
    assert warmup_samples(taken, 0) == []


def test_warmup_samples_refuse_what_they_cannot_keep_apart():
    with pytest.raises(ValueError, match="every token"):
        warmup_samples([Sample((1000,), 1), Sample((1001,), 1)], 1, vocab=1002)
    with pytest.raises(ValueError, match="share 2 leading"):
        warmup_samples([Sample((1, 2, 3), 1), Sample((1, 5, 3), 1)], 1, shared_prefix=2)
    with pytest.raises(ValueError, match="share 2 leading"):  # nothing past the prefix
        warmup_samples([Sample((1, 2), 1)], 1, shared_prefix=2)
