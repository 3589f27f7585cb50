"""Statistics of ``looplm bench lm``: mean ± std over seeds, 2σ verdicts, the scaling-law fit.

A difference ``Δ = mean_m − mean_ref`` of validation bits/byte is judged against its standard
error ``σ_Δ = sqrt(s_m²/n_m + s_ref²/n_ref)`` (s: sample standard deviations over seeds):
``better`` when ``Δ < −2σ_Δ``, ``worse`` when ``Δ > 2σ_Δ``, else ``tie``; the margin is ``Δ/σ_Δ``.

Scaling fit ``L(C) = E + A·C^(−α)`` (Kaplan et al. 2020; Hoffmann et al. 2022) over the budgets
of one model: for each α on a grid the best (E, A) is a linear least-squares solve, and the α of
the smallest squared error wins (no optimiser to start or to diverge). Its uncertainty is a
bootstrap over seeds: each budget's mean is recomputed from seeds drawn with replacement and the
fit redone; the standard deviation of each parameter over the draws is reported, and so is the
share of draws in which two models' curves cross inside the searched range.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

ALPHAS = np.linspace(0.01, 2.0, 400)
BOOTSTRAPS = 200


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def verdict(values: Sequence[float], reference: Sequence[float]) -> dict[str, Any]:
    """Lower is better: ``{delta, sigma, margin, verdict}`` of ``values`` against ``reference``."""
    (m, s), (mr, sr) = mean_std(values), mean_std(reference)
    sigma = math.sqrt(s * s / len(values) + sr * sr / len(reference))
    delta = m - mr
    margin = delta / sigma if sigma > 0 else (0.0 if delta == 0 else math.copysign(math.inf, delta))
    word = "better" if margin < -2 else "worse" if margin > 2 else "tie"
    return {"delta": delta, "sigma": sigma, "margin": margin, "verdict": word}


def fit_power_law(flops: Sequence[float], loss: Sequence[float]) -> dict[str, float]:
    """``L = E + A·C^(−α)`` through the points; -> ``{E, A, alpha, rmse}``."""
    c = np.asarray(flops, dtype=float)
    y = np.asarray(loss, dtype=float)
    c0 = c.min()
    best = (math.inf, 0.0, 0.0, 0.0)
    for alpha in ALPHAS:
        x = np.stack([np.ones_like(c), (c / c0) ** -alpha], 1)
        coef, *_ = np.linalg.lstsq(x, y, rcond=None)
        sse = float(((x @ coef - y) ** 2).sum())
        if sse < best[0]:
            best = (sse, float(coef[0]), float(coef[1]), float(alpha))
    sse, e, a, alpha = best
    edge = alpha in (ALPHAS[0], ALPHAS[-1])  # at a bound of the search: no power law in these points
    return {"E": e, "A": a * c0 ** alpha, "alpha": alpha, "rmse": math.sqrt(sse / len(c)),
            "alpha_at_bound": edge}


def predict(fit: dict[str, float], flops: np.ndarray) -> np.ndarray:
    return fit["E"] + fit["A"] * flops ** -fit["alpha"]


def crossing(a: dict[str, float], b: dict[str, float], lo: float, hi: float) -> float | None:
    """The first budget in ``[lo, hi]`` (log grid) where the fitted curves cross, else None."""
    grid = np.logspace(math.log10(lo), math.log10(hi), 2000)
    diff = predict(a, grid) - predict(b, grid)
    flips = np.nonzero(np.sign(diff[1:]) != np.sign(diff[:-1]))[0]
    return float(grid[flips[0] + 1]) if len(flips) else None


def scaling(points: dict[str, dict[float, list[float]]], seed: int = 0) -> dict[str, Any]:
    """``points[model][budget] = [loss per seed]`` (≥ 2 budgets each) -> per model the fit, the
    bootstrap standard deviations ``E_std, A_std, alpha_std``; with two models also their crossing
    (the fitted budget, None if none in 1/10 to 1000 × the budgets) and ``cross_share``."""
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {"fits": {}}
    draws: dict[str, list[dict[str, float]]] = {}
    for model, by_budget in points.items():
        budgets = sorted(by_budget)
        fit: dict[str, Any] = dict(fit_power_law(budgets, [float(np.mean(by_budget[b])) for b in budgets]))
        draws[model] = []
        for _ in range(BOOTSTRAPS):
            means = [float(np.mean(rng.choice(by_budget[b], len(by_budget[b])))) for b in budgets]
            draws[model].append(fit_power_law(budgets, means))
        for k in ("E", "A", "alpha"):
            fit[f"{k}_std"] = float(np.std([d[k] for d in draws[model]]))
        fit["points"] = {str(b): mean_std(by_budget[b]) for b in budgets}
        out["fits"][model] = fit
    if len(points) == 2:
        (m1, f1), (m2, f2) = out["fits"].items()
        budgets = [b for p in points.values() for b in p]
        lo, hi = min(budgets) / 10, max(budgets) * 1000
        out["crossing"] = crossing(f1, f2, lo, hi)
        crossed = [crossing(a, b, lo, hi) is not None for a, b in zip(draws[m1], draws[m2])]
        out["cross_share"] = float(np.mean(crossed))
        out["pair"] = [m1, m2]
    return out
