"""Paired tests for differences between arms evaluated on the same images."""

from __future__ import annotations

import numpy as np


def paired_bootstrap(a, b, n_boot: int = 10_000, seed: int = 0) -> dict:
    """Difference of mean per-image scores (b - a), resampling images with replacement.

    `a` and `b` are per-image correctness (0/1) or per-image accuracy averaged over seeds, in the
    same image order. Returns the observed difference, a 95% percentile interval and a two-sided p.
    """
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError("paired_bootstrap needs two equal-length 1-d arrays")
    d = b - a
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(d), (n_boot, len(d)))
    boots = d[idx].mean(1)
    p = 2 * min((boots <= 0).mean(), (boots >= 0).mean())
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return {"diff": float(d.mean()), "ci95": [float(lo), float(hi)], "p": float(min(1.0, p)),
            "inside_noise": bool(lo <= 0 <= hi), "n": int(len(d))}


def mcnemar_exact(a, b) -> dict:
    """Exact McNemar test on two 0/1 correctness vectors of the same images."""
    from scipy.stats import binomtest

    a, b = np.asarray(a, bool), np.asarray(b, bool)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    n = only_a + only_b
    p = 1.0 if n == 0 else float(binomtest(only_b, n, 0.5).pvalue)
    return {"only_a": only_a, "only_b": only_b, "p": p}
