"""Fitting the cost model: parameters of synthetic data are recovered (exactly without
noise; within stated tolerances with 5% multiplicative noise), a straight line (no knee) is
found as one, the transfer model likewise; the exact NNLS; the profile's JSON round trip
and its refusals."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from pdserve.bench.costmodel.fit import StepObservation, fit_step, fit_transfer, nnls
from pdserve.protocol.cost_profile import (
    VERSION,
    CostProfile,
    StepModel,
    TransferModel,
    chunk_pairs,
)

# every term matters somewhere on the grid: the knee at ~7 tokens, pairs a third of a long
# chunk at a large offset, context a third of a large decode batch, a sequence's own cost a
# fifth of a small decode step
TRUE = StepModel(base_s=0.004, floor_s=0.025, token_s=0.0035, pair_s=1e-6, context_s=5e-6,
                 seq_s=0.002)


def grid() -> list[tuple[int, int, int, str, int]]:
    """(tokens, pairs, context, kind, seqs) shaped like `pdserve profile`'s grid."""
    rows = [(n, chunk_pairs(o, n), 0, "prefill", 0)
            for n in (16, 32, 64, 128, 256, 512, 1024, 2048) for o in (0, 512, 1536)]
    rows += [(b, 0, b * c, "decode", b) for b in (1, 2, 4, 8, 16, 32, 64)
             for c in (64, 256, 1024, 2048) if b * c <= 32768]
    rows += [(n + b, chunk_pairs(0, n), b * 64, "mixed", b) for b in (4, 16)
             for n in (32, 256)]
    return rows


def observations(model: StepModel, sigma: float, seed: int = 0) -> list[StepObservation]:
    rng = np.random.default_rng(seed)
    return [StepObservation(t, p, c, model.step_s(t, p, c, q)
                            * float(np.exp(rng.normal(0, sigma))), kind, q)
            for t, p, c, kind, q in grid()]


def test_noiseless_data_gives_back_its_parameters():
    fit = fit_step(observations(TRUE, 0.0))
    for name in ("base_s", "floor_s", "token_s", "pair_s", "context_s", "seq_s"):
        assert getattr(fit.model, name) == pytest.approx(getattr(TRUE, name), rel=1e-4), name
    assert fit.knee_tokens == pytest.approx(TRUE.knee_tokens, rel=1e-4)
    assert fit.residuals.p90 < 1e-6


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_noisy_data_gives_back_its_parameters_within_tolerance(seed):
    """5% log-normal noise: the slopes within 10%, the flat part (base + floor) within 10%
    (noise trades base against floor: only their sum is pinned down below the knee), every
    prediction within 5% of the true model's on the median point."""
    obs = observations(TRUE, 0.05, seed)
    fit = fit_step(obs)
    m = fit.model
    assert m.token_s == pytest.approx(TRUE.token_s, rel=0.1)
    assert m.pair_s == pytest.approx(TRUE.pair_s, rel=0.1)
    assert m.context_s == pytest.approx(TRUE.context_s, rel=0.1)
    assert m.base_s + m.floor_s == pytest.approx(TRUE.base_s + TRUE.floor_s, rel=0.1)
    error = [abs(m.step_s(o.tokens, o.pairs, o.context, o.seqs)
                 / TRUE.step_s(o.tokens, o.pairs, o.context, o.seqs) - 1) for o in obs]
    assert np.median(error) < 0.05
    assert 0.02 < fit.residuals.median < 0.08  # the noise itself, about 0.674 sigma
    assert set(fit.by_kind) == {"prefill", "decode", "mixed"}


def test_a_straight_line_is_fitted_without_a_knee():
    line = StepModel(base_s=0.01, floor_s=0.0, token_s=0.002, pair_s=0.0, context_s=1e-6)
    fit = fit_step(observations(line, 0.0))
    assert fit.model.floor_s == pytest.approx(0.0, abs=1e-9)
    assert fit.model.token_s == pytest.approx(0.002, rel=1e-4)
    assert fit.model.base_s == pytest.approx(0.01, rel=1e-4)
    assert fit.model.pair_s == pytest.approx(0.0, abs=1e-12)
    assert fit.residuals.max < 1e-6


def test_fit_step_needs_enough_points():
    with pytest.raises(ValueError, match="at least 4"):
        fit_step(observations(TRUE, 0.0)[:3])
    with pytest.raises(ValueError):
        StepObservation(0, 0, 0, 0.1)
    with pytest.raises(ValueError):
        StepObservation(4, 0, 0, 0.0)


def test_nnls_matches_a_brute_force_search():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(12, 3)), rng.normal(size=12)
    x = nnls(a, b)
    assert np.all(x >= 0)
    best = min(np.linalg.norm(a @ np.array(c) - b)
               for c in itertools.product(np.linspace(0, 2, 41), repeat=3))
    assert np.linalg.norm(a @ x - b) <= best + 1e-12


def test_transfer_fit_gives_back_latency_and_bandwidth():
    sizes = [1 << 20, 4 << 20, 16 << 20, 64 << 20] * 5
    rng = np.random.default_rng(0)
    for sigma, tol in ((0.0, 1e-6), (0.05, 0.1)):
        times = [(2e-3 + n / 1.5e9) * float(np.exp(rng.normal(0, sigma))) for n in sizes]
        fit = fit_transfer(sizes, times)
        assert fit.model.latency_s == pytest.approx(2e-3, rel=max(tol, 3 * sigma))
        assert fit.model.bytes_per_s == pytest.approx(1.5e9, rel=tol)
    with pytest.raises(ValueError, match="do not grow"):
        fit_transfer([1, 2, 3], [1.0, 0.5, 0.4])
    with pytest.raises(ValueError, match="distinct"):
        fit_transfer([4, 4], [1.0, 1.0])


def _profile(**changes) -> CostProfile:
    fields = dict(source="measured", machine={"cpu": "test"}, model={"name": "m"},
                  kv_bytes_per_token=46080, kv_capacity_tokens=8192, step=TRUE,
                  transfer=TransferModel(1e-3, 1e9), router_s=0.002, stream_s=0.001,
                  sources={"step_fit": {"median_rel_err": 0.01}})
    return CostProfile(**{**fields, **changes})


def test_profile_json_round_trip(tmp_path):
    profile = _profile()
    path = tmp_path / "p.json"
    profile.save(path)
    assert CostProfile.load(path) == profile
    assert json.loads(path.read_text())["version"] == VERSION


def test_profile_refuses_another_version_and_bad_values(tmp_path):
    data = _profile().to_json()
    data["version"] = VERSION + 1
    with pytest.raises(ValueError, match="version"):
        CostProfile.from_json(data)
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read"):
        CostProfile.load(path)
    with pytest.raises(ValueError):
        _profile(kv_capacity_tokens=0)
    with pytest.raises(ValueError):
        _profile(router_s=-1.0)
    with pytest.raises(ValueError):
        StepModel(base_s=-1e-3, floor_s=0, token_s=0, pair_s=0, context_s=0)
    with pytest.raises(ValueError):
        TransferModel(latency_s=0.0, bytes_per_s=0.0)
