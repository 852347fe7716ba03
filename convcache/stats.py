"""Paired tests for differences between arms evaluated on the same images (shared: compare and the study
use them, export's int8 probe uses McNemar's test)."""

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


def seed_photo_bootstrap(a, b, n_boot: int = 10_000, seed: int = 0, margin: float | None = None) -> dict:
    """Difference b - a of two arms run with the same seeds on the same photos, resampling seeds, then
    photos (a two-level bootstrap: both sources of variation, the training seed and the test sample).

    `a`, `b`: (seeds, photos) 0/1 correctness, row i of each from seed i (paired by seed and photo).
    Returns the difference, its 95% percentile interval, a two-sided p, and with `margin` the two
    one-sided tests of equivalence (TOST): `equivalent` when both p_lower (diff <= -margin) and p_upper
    (diff >= +margin) are below 0.05, i.e. the 90% interval lies inside (-margin, +margin)."""
    a, b = np.atleast_2d(np.asarray(a, float)), np.atleast_2d(np.asarray(b, float))
    if a.shape != b.shape or a.size == 0:
        raise ValueError("seed_photo_bootstrap needs two equal (seeds, photos) arrays")
    d = b - a
    n_seeds, n_photos = d.shape
    rng = np.random.default_rng(seed)
    boots = np.empty(n_boot)
    for i in range(n_boot):
        s = rng.integers(0, n_seeds, n_seeds)
        p = rng.integers(0, n_photos, n_photos)
        boots[i] = d[np.ix_(s, p)].mean()
    lo, hi = np.percentile(boots, [2.5, 97.5])
    out = {"diff": float(d.mean()), "ci95": [float(lo), float(hi)],
           "p": float(min(1.0, 2 * min((boots <= 0).mean(), (boots >= 0).mean()))),
           "seeds": int(n_seeds), "photos": int(n_photos), "n_boot": int(n_boot)}
    if margin is not None:
        lo90, hi90 = np.percentile(boots, [5, 95])
        p_lower, p_upper = float((boots <= -margin).mean()), float((boots >= margin).mean())
        out.update({"margin": float(margin), "ci90": [float(lo90), float(hi90)], "p_lower": p_lower,
                    "p_upper": p_upper, "equivalent": bool(max(p_lower, p_upper) < 0.05),
                    "noninferior": bool(p_lower < 0.05)})
    return out


def accuracy_interval(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score 95% interval of an accuracy of `correct` out of `n`."""
    if n <= 0:
        return (float("nan"), float("nan"))
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(centre - half), float(centre + half)


SMALL_HALF = 200  # below this many photos an accuracy's 95% interval is wider than about +-7 points


def accuracy_summary(accuracy: float, n: int) -> str:
    """`84.2% (n=500, 95% CI 80.8-87.2%)`: an accuracy with its sample size and Wilson interval."""
    lo, hi = accuracy_interval(round(accuracy * n), n)
    return f"{100 * accuracy:.1f}% (n={n}, 95% CI {100 * lo:.1f}-{100 * hi:.1f}%)"


def small_half_warning(name: str, n: int) -> str | None:
    """A warning line when an evaluation half is too small for its accuracy to mean much."""
    if n >= SMALL_HALF:
        return None
    lo, hi = accuracy_interval(n // 2, n)
    return (f"warning: the {name} has only {n} images: an accuracy near 50% is uncertain by about "
            f"+-{100 * (hi - lo) / 2:.0f} points; add validation images")


def ratio_interval(ratios, confidence: float = 0.95) -> dict:
    """Paired per-round speed ratios (ours / peer, one per interleaved round) as their geometric mean with a
    t-interval on the log ratios: {"ratio", "low", "high", "ahead", "rounds"} (low/high None for one round)."""
    import math

    from scipy import stats

    logs = [math.log(r) for r in ratios]
    n = len(logs)
    mean = sum(logs) / n
    out = {"ratio": math.exp(mean), "low": None, "high": None, "ahead": sum(r > 1 for r in ratios), "rounds": n}
    if n > 1:
        sd = math.sqrt(sum((x - mean) ** 2 for x in logs) / (n - 1))
        half = stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
        out["low"], out["high"] = math.exp(mean - half), math.exp(mean + half)
    return out


def ratio_text(ratios) -> str:
    """`ratio_interval` as `1.03x [0.98, 1.08], ahead 3 of 3`."""
    r = ratio_interval(ratios)
    span = f" [{r['low']:.2f}, {r['high']:.2f}]" if r["low"] is not None else ""
    return f"{r['ratio']:.2f}x{span}, ahead {r['ahead']} of {r['rounds']}"


def marginal_rate(rows: int, seconds: float, rows_part: int, seconds_part: float) -> tuple[float, float]:
    """The line through two runs of one pipeline, a larger and a smaller (rows, seconds): its slope as a rate
    (the rows the larger run adds over the seconds it adds: the per-row cost, fixed costs out) and its intercept
    (the fixed seconds of a run). NaN for both when the larger run took no longer: noise, no line."""
    if rows <= rows_part or seconds <= seconds_part:
        return float("nan"), float("nan")
    rate = (rows - rows_part) / (seconds - seconds_part)
    return rate, seconds - rows / rate
