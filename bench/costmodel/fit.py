"""Fitting a cost profile's models (protocol.cost_profile) to measurements.

Step model. With the knee K = floor_s / token_s, the step model reads

    step_s = base_s + token_s * max(K, tokens) + pair_s * pairs + context_s * context

which, for a fixed K, is linear in (base_s, token_s, pair_s, context_s), all >= 0. `fit_step`
tries K on a log-spaced grid over the observed token counts (then a finer grid around the
best), plus K = 0 (no knee: a straight line in tokens, floor_s = 0), solves a non-negative
least-squares problem for each, and keeps the best. Steps span milliseconds to seconds, so
the squared error minimised is the RELATIVE one: every row is divided by its measured time.

Transfer model: seconds = latency_s + bytes / bytes_per_s, the same way (`fit_transfer`).

Residuals are |predicted / measured - 1| per point; their median, p90 and maximum go into
the profile's `sources`, so a reader sees how well the model held.

numpy only (scipy is not a dependency). `nnls` solves small problems exactly by trying every
support set: the optimum of a non-negative least-squares problem is the unconstrained
least-squares solution on its own support, so the best feasible one of those is it.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pdserve.protocol.cost_profile import StepModel, TransferModel

MAX_NNLS_COLUMNS = 8  # 2^8 support sets: beyond that an active-set method would be needed


@dataclass(frozen=True)
class StepObservation:
    """One measured engine step: what it computed and how long `step()` took."""

    tokens: int  # prefill chunk tokens + one per decoding sequence
    pairs: int  # causal prefill attention pairs (profile.chunk_pairs, summed over chunks)
    context: int  # context tokens the decoding sequences read, summed
    seconds: float
    kind: str = ""  # "prefill", "decode" or "mixed": for plots and per-kind residuals
    seqs: int = 0  # decoding sequences in the step

    def __post_init__(self) -> None:
        if self.tokens < 1 or self.pairs < 0 or self.context < 0 or not self.seconds > 0:
            raise ValueError(f"bad step observation {self}")


@dataclass(frozen=True)
class Residuals:
    """Relative errors |predicted / measured - 1| of a fit on its own points."""

    points: int
    median: float
    p90: float
    max: float

    @classmethod
    def of(cls, predicted: np.ndarray, measured: np.ndarray) -> Residuals:
        rel = np.abs(np.asarray(predicted) / np.asarray(measured) - 1.0)
        return cls(int(rel.size), float(np.median(rel)), float(np.quantile(rel, 0.9)),
                   float(rel.max()))

    def as_dict(self) -> dict:
        return {"points": self.points, "median_rel_err": self.median,
                "p90_rel_err": self.p90, "max_rel_err": self.max}


@dataclass(frozen=True)
class StepFit:
    model: StepModel
    knee_tokens: float  # 0.0: no knee (floor_s = 0, a straight line in tokens)
    residuals: Residuals
    by_kind: dict  # kind -> Residuals of that kind's points

    def summary(self) -> dict:
        """What a profile's `sources` records about the fit."""
        return {"method": "relative-error NNLS over a knee grid", "knee_tokens": self.knee_tokens,
                **self.residuals.as_dict(),
                "by_kind": {k: r.as_dict() for k, r in self.by_kind.items()}}


@dataclass(frozen=True)
class TransferFit:
    model: TransferModel
    residuals: Residuals

    def summary(self) -> dict:
        return {"method": "relative-error NNLS", **self.residuals.as_dict()}


def nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """argmin ||a x - b|| over x >= 0, exactly, for a few columns (see the module)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    n = a.shape[1]
    if n > MAX_NNLS_COLUMNS:
        raise ValueError(f"nnls solves up to {MAX_NNLS_COLUMNS} columns, got {n}")
    best, best_loss = np.zeros(n), float(b @ b)
    for size in range(1, n + 1):
        for support in itertools.combinations(range(n), size):
            cols = list(support)
            coef = np.linalg.lstsq(a[:, cols], b, rcond=None)[0]
            if np.any(coef < 0):
                continue
            x = np.zeros(n)
            x[cols] = coef
            r = a @ x - b
            if (loss := float(r @ r)) < best_loss:
                best, best_loss = x, loss
    return best


def _relative_nnls(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """Non-negative coefficients minimising sum(((x @ c) / y - 1) ** 2), and that sum.
    Columns are scaled to unit maximum first: pairs reach millions, the constant is 1."""
    scale = np.abs(x).max(axis=0)
    scale[scale == 0] = 1.0
    a = x / scale / y[:, None]
    coef = nnls(a, np.ones_like(y)) / scale
    r = (x @ coef) / y - 1.0
    return coef, float(r @ r)


def _step_design(tokens: np.ndarray, pairs: np.ndarray, context: np.ndarray,
                 seqs: np.ndarray, knee: float) -> np.ndarray:
    return np.column_stack([np.ones_like(tokens), np.maximum(tokens, knee), pairs, context,
                            seqs])


def _golden_min(f, lo: float, hi: float, iterations: int = 40) -> float:
    """A minimum of `f` on [lo, hi] by golden-section search (f unimodal there)."""
    g = (np.sqrt(5.0) - 1.0) / 2.0
    a, b = lo, hi
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(iterations):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    return (a + b) / 2.0


def fit_step(observations: Sequence[StepObservation], knees: int = 40) -> StepFit:
    """The step model that best fits `observations` (see the module). Raises ValueError for
    fewer than 4 observations."""
    if len(observations) < 4:
        raise ValueError(f"fitting a step model needs at least 4 observations, got "
                         f"{len(observations)}")
    t = np.array([o.tokens for o in observations], dtype=float)
    p = np.array([o.pairs for o in observations], dtype=float)
    c = np.array([o.context for o in observations], dtype=float)
    q = np.array([o.seqs for o in observations], dtype=float)
    y = np.array([o.seconds for o in observations], dtype=float)

    def loss_at(knee: float) -> tuple[float, np.ndarray]:
        coef, loss = _relative_nnls(_step_design(t, p, c, q, knee), y)
        return loss, coef

    grid = [0.0, *np.geomspace(t.min(), t.max(), knees)]
    best_knee = min((loss_at(k)[0], k) for k in grid)[1]
    if best_knee > 0:  # refine between the best knee's neighbours on the coarse grid
        ratio = (t.max() / t.min()) ** (1.0 / max(1, knees - 1))
        lo, hi = np.log(max(t.min(), best_knee / ratio)), np.log(min(t.max(), best_knee * ratio))
        refined = _golden_min(lambda u: loss_at(float(np.exp(u)))[0], lo, hi)
        best_knee = min((loss_at(k)[0], k) for k in (best_knee, float(np.exp(refined))))[1]
    _, (base, token, pair, ctx, seq) = loss_at(best_knee)
    model = StepModel(base_s=float(base), floor_s=float(token * best_knee), token_s=float(token),
                      pair_s=float(pair), context_s=float(ctx), seq_s=float(seq))
    predicted = np.array([model.step_s(o.tokens, o.pairs, o.context, o.seqs)
                          for o in observations])
    kinds = sorted({o.kind for o in observations if o.kind})
    by_kind = {k: Residuals.of(predicted[[o.kind == k for o in observations]],
                               y[[o.kind == k for o in observations]]) for k in kinds}
    return StepFit(model, float(best_knee), Residuals.of(predicted, y), by_kind)


def fit_transfer(nbytes: Sequence[int], seconds: Sequence[float]) -> TransferFit:
    """latency_s + bytes / bytes_per_s fitted to timed transfers. Raises ValueError for
    fewer than 2 distinct sizes, or times that do not grow with size."""
    b = np.asarray(nbytes, dtype=float)
    y = np.asarray(seconds, dtype=float)
    if b.shape != y.shape or len(set(b.tolist())) < 2 or np.any(y <= 0) or np.any(b <= 0):
        raise ValueError("fitting a transfer model needs positive times of at least 2 "
                         "distinct positive sizes")
    (latency, per_byte), _ = _relative_nnls(np.column_stack([np.ones_like(b), b]), y)
    if per_byte <= 0:
        raise ValueError("transfer times do not grow with size: no bandwidth to fit")
    model = TransferModel(latency_s=float(latency), bytes_per_s=float(1.0 / per_byte))
    predicted = np.array([model.seconds(int(n)) for n in b])
    return TransferFit(model, Residuals.of(predicted, y))
