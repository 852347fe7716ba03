"""Cross-fitted selection of the representation, with an estimate that cannot flatter itself.

Every labelled photo the user gives is pooled (train, validation: any split of the store). Folds are made of
*photos*, grouped by content (sha256): a photo's augmented copies always sit in its fold, never in another,
and the same bytes listed twice count once. Only originals (copy 0) are ever scored.

`select` chooses, on the photos it is given, in two stages, by inner cross-validated accuracy:
  1. the representation: each tap and the concatenations in the grid, with the probe's regularisation C,
     trained on originals only (K = 0: the cheap stage, where the layer's 4-6 points live);
  2. K: copies 0..K of the chosen representation (each C again), keeping the smallest K whose accuracy is
     within one standard error (paired over photos) of the best K's.

`nested` wraps `select` in an outer loop: each outer fold's photos take no part in choosing, and are scored by
the candidate chosen on the others, refit on them. The pooled outer-fold accuracy over every photo is the
estimate `fit` prints (n = the photos), with a Wilson interval: it estimates the whole procedure, choices
included. The final model is `select` on every photo, refit on every photo.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_CS = (0.01, 0.1, 1.0)
C_RANGE = (1e-6, 1e3)  # the grid is extended by decades, within these, while the best C sits at its edge


@dataclass(frozen=True)
class Candidate:
    """A linear probe on the concatenation of `taps` (standardised), with regularisation C, trained on copies
    0..`copies` of the training photos."""

    taps: tuple
    C: float
    copies: int = 0

    @property
    def name(self) -> str:
        return f"{'+'.join(self.taps)} C={self.C:g} K={self.copies}"


@dataclass
class Pool:
    """Every row of the photos to learn from: each tap's features (rows x d, flattened), the label, the photo
    (an index per distinct content), the copy. `photo_label[p]` is photo p's label."""

    features: dict
    label: np.ndarray
    photo: np.ndarray
    copy: np.ndarray
    photo_label: np.ndarray = field(init=False)

    def __post_init__(self):
        n = int(self.photo.max()) + 1 if len(self.photo) else 0
        self.photo_label = np.full(n, -1, np.int64)
        self.photo_label[self.photo] = self.label
        originals = self.copy == 0
        if len(np.unique(self.photo[originals])) != n:
            raise ValueError("every photo needs its original (copy 0) among the rows")

    @property
    def n_photos(self) -> int:
        return len(self.photo_label)

    @property
    def max_copy(self) -> int:
        return int(self.copy.max()) if len(self.copy) else 0

    def rows(self, photos: np.ndarray, max_copy: int = 0) -> np.ndarray:
        """Row positions of `photos`' copies 0..max_copy (originals only for max_copy 0)."""
        keep = np.isin(self.photo, photos) & (self.copy <= max_copy)
        return np.flatnonzero(keep)

    def originals(self, photos: np.ndarray) -> np.ndarray:
        """Row positions of `photos`' originals, in the order of `photos`."""
        rows = self.rows(photos, 0)
        order = {p: i for i, p in enumerate(photos.tolist())}
        return rows[np.argsort([order[p] for p in self.photo[rows].tolist()], kind="stable")]

    def upto(self, max_copy: int) -> Pool:
        """The same photos with copies 0..max_copy only."""
        keep = self.copy <= max_copy
        return Pool({t: f[keep] for t, f in self.features.items()}, self.label[keep], self.photo[keep],
                    self.copy[keep])

    def matrix(self, taps: tuple, rows: np.ndarray) -> np.ndarray:
        parts = [self.features[t][rows].reshape(len(rows), -1) for t in taps]
        return np.concatenate(parts, axis=1).astype(np.float32, copy=False) if len(parts) > 1 else parts[0]

    @classmethod
    def from_store(cls, fs, taps: list[str] | None = None, splits: list[str] | None = None,
                   max_copy: int | None = None) -> Pool:
        """Pool the splits of a `FeatureStore` (default: every split): photos are identified by content, so a
        photo listed in two splits is one photo."""
        splits = splits or fs.splits
        taps = taps or fs.variables(splits[0])
        feats, label, sha, copy = {t: [] for t in taps}, [], [], []
        for split in splits:
            first = None
            for t in taps:
                data = fs.load(split, max_copy=max_copy, variable=t)
                feats[t].append(data.features.reshape(len(data), -1))
                first = data if first is None else first
            label.append(first.label)
            sha += first.sha256
            copy.append(first.copy)
        ids = {}
        photo = np.array([ids.setdefault(s, len(ids)) for s in sha], np.int64)
        rows = {}  # one row per (photo, copy): a photo in two splits keeps its first split's rows
        keep = [rows.setdefault((p, c), i) == i for i, (p, c) in enumerate(zip(photo.tolist(),
                                                                                 np.concatenate(copy).tolist()))]
        keep = np.array(keep, bool)
        return cls({t: np.concatenate(v)[keep] for t, v in feats.items()}, np.concatenate(label)[keep], photo[keep],
                   np.concatenate(copy)[keep])


def photo_folds(pool: Pool, photos: np.ndarray, n_splits: int, seed: int) -> list[np.ndarray]:
    """`photos` split into `n_splits` folds stratified by label (sklearn's StratifiedKFold over photos: each
    photo is one group, and its copies follow it). Returns each fold's photos."""
    from sklearn.model_selection import StratifiedKFold

    y = pool.photo_label[photos]
    n_splits = max(2, min(n_splits, int(np.bincount(y).min()) if len(y) else 2))
    splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return [photos[test] for _, test in splitter.split(np.zeros(len(photos)), y)]


def fit_candidate(pool: Pool, cand: Candidate, photos: np.ndarray):
    """The probe of `cand` (`LogRegHead` at its one C: the head `fit` exports) fit on copies 0..K of `photos`."""
    from convcache.train.heads import LogRegHead

    rows = pool.rows(photos, cand.copies)
    return LogRegHead(Cs=(cand.C,), max_iter=1000).fit(pool.matrix(cand.taps, rows), pool.label[rows])


def correct(pool: Pool, cand: Candidate, train: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Per test photo (in `test` order): 1 if the probe fit on `train` classifies its original correctly."""
    model = fit_candidate(pool, cand, train)
    rows = pool.originals(test)
    return (model.predict(pool.matrix(cand.taps, rows)) == pool.label[rows]).astype(np.int8)


def oof(pool: Pool, cand: Candidate, photos: np.ndarray, folds: list[np.ndarray]) -> np.ndarray:
    """Out-of-fold correctness of `cand` over `photos` (in `photos` order), by `folds` of them."""
    out = {}
    for test in folds:
        train = np.setdiff1d(photos, test)
        out.update(zip(test.tolist(), correct(pool, cand, train, test).tolist()))
    return np.array([out[p] for p in photos.tolist()], np.int8)


@dataclass
class Selection:
    """What `select` chose, and every candidate's inner out-of-fold accuracy (name -> mean, n)."""

    chosen: Candidate
    scores: dict
    correct_by: dict = field(default_factory=dict, repr=False)  # Candidate -> per-photo 0/1, inner OOF
    runner_up: Candidate | None = None
    paired_difference: float | None = None  # chosen minus runner-up, inner OOF accuracy points
    paired_se: float | None = None
    seconds: float = 0.0


def tune_c(score, taps: tuple, k: int, Cs=DEFAULT_CS) -> Candidate:
    """The best C for (taps, K) by `score(candidate)` (higher is better; ties: the smaller C): the grid `Cs`
    grows by a decade on either side while the best sits at that edge, within `C_RANGE`. The lower edge grows
    only while it is *strictly* better than its neighbour: a tie (e.g. every C at chance) does not walk the grid
    down to C_RANGE's floor."""
    grid = sorted(Cs)
    while True:
        best = max((Candidate(taps, C, k) for C in grid), key=lambda c: (score(c), -c.C))
        lower_wins = len(grid) < 2 or score(best) > score(Candidate(taps, grid[1], k))
        if best.C == grid[0] and lower_wins and grid[0] / 10 >= C_RANGE[0]:
            grid.insert(0, float(f"{grid[0] / 10:.6g}"))
        elif best.C == grid[-1] and grid[-1] * 10 <= C_RANGE[1]:
            grid.append(float(f"{grid[-1] * 10:.6g}"))
        else:
            return best


@dataclass(frozen=True)
class Search:
    """What `select` searches over: the representations (tuples of taps), the probe's starting C grid (grown at
    its edges by `tune_c`), the copies K on offer, and the inner folds (their number and seed)."""

    representations: tuple
    Cs: tuple = DEFAULT_CS
    copies: tuple = (0,)
    n_folds: int = 3
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "representations", tuple(tuple(r) for r in self.representations))
        object.__setattr__(self, "Cs", tuple(float(c) for c in self.Cs))
        object.__setattr__(self, "copies", tuple(sorted(set(int(k) for k in self.copies) | {0})))
        if not self.representations or not self.Cs or self.n_folds < 2:
            raise ValueError("a search needs a representation, a C and at least 2 folds")


def select(pool: Pool, photos: np.ndarray, search: Search) -> Selection:
    """Stage 1: the best (taps, C) at K = 0; stage 2: K among `copies` at those taps (each at its best C), the
    smallest K within one paired standard error of the best. Each (taps, K) gets its own best C: the grid `Cs`
    grows by a decade on either side while the best C sits at that edge (within `C_RANGE`), so no arm is
    judged at a C the grid cut off. All on `photos` alone, by inner folds."""
    t0 = time.perf_counter()
    folds = photo_folds(pool, photos, search.n_folds, search.seed)
    scores, correct_by = {}, {}

    def score(c: Candidate) -> float:
        if c not in correct_by:
            correct_by[c] = oof(pool, c, photos, folds)
            scores[c.name] = float(correct_by[c].mean())
        return scores[c.name]

    def best_c(taps: tuple, k: int) -> Candidate:
        return tune_c(score, taps, k, search.Cs)

    stage1 = [best_c(r, 0) for r in search.representations]
    ranked = sorted(stage1, key=lambda c: (-score(c), len(c.taps), c.C))
    best = ranked[0]
    by_k = {}
    for k in search.copies:
        by_k[k] = best if k == 0 else best_c(best.taps, k)
    top = max(by_k.values(), key=lambda c: (scores[c.name], -c.copies))
    chosen = top
    for k in sorted(by_k):  # the smallest K within one SE of the best K (paired over photos)
        d = correct_by[top].astype(float) - correct_by[by_k[k]]
        se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0
        if d.mean() <= se:
            chosen = by_k[k]
            break
    others = [c for c in ranked if c.taps != chosen.taps]
    runner = others[0] if others else None
    diff = se = None
    if runner is not None:
        base = Candidate(chosen.taps, chosen.C, 0) if chosen.copies else chosen
        score(base)
        d = correct_by[base].astype(float) - correct_by[runner]
        diff, se = float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d)))
    return Selection(chosen, {n: (s, len(photos)) for n, s in scores.items()}, correct_by, runner, diff, se,
                     time.perf_counter() - t0)


@dataclass
class Estimate:
    """The nested cross-fitted estimate: per photo, whether the outer fold's chosen model got it right."""

    photos: np.ndarray
    correct: np.ndarray
    chosen: list  # each outer fold's Candidate
    seconds: float = 0.0

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean())

    @property
    def n(self) -> int:
        return len(self.correct)

    def interval(self) -> tuple[float, float]:
        from convcache.stats import accuracy_interval

        return accuracy_interval(int(self.correct.sum()), self.n)


def nested(pool: Pool, search: Search, n_outer: int = 5, progress=None) -> Estimate:
    """Each outer fold's photos scored by the candidate `select` chose on the other photos (by `search`, its
    inner folds seeded per outer fold), refit on them. The outer folds are seeded by `search.seed`."""
    t0 = time.perf_counter()
    photos = np.arange(pool.n_photos)
    folds = photo_folds(pool, photos, n_outer, search.seed)
    got, chosen = {}, []
    for i, test in enumerate(folds):
        train = np.setdiff1d(photos, test)
        sel = select(pool, train, replace(search, seed=search.seed + 1 + i))
        chosen.append(sel.chosen)
        got.update(zip(test.tolist(), correct(pool, sel.chosen, train, test).tolist()))
        log.info("outer fold %d/%d: chose %s, %d/%d right", i + 1, len(folds), sel.chosen.name,
                 sum(got[p] for p in test.tolist()), len(test))
        if progress is not None:
            progress(i + 1, len(folds), sel.chosen)
    return Estimate(photos, np.array([got[p] for p in photos.tolist()], np.int8), chosen, time.perf_counter() - t0)


def default_representations(taps: list[str]) -> list[tuple]:
    """Each tap alone, and the concatenations of a layer's average and max, and of consecutive layers'
    average-pooled taps, where the taps exist."""
    reps = [(t,) for t in taps]
    present = set(taps)
    for layer in ("block3_pool", "block4_pool", "block5_pool"):
        if {f"{layer}_avg", f"{layer}_max"} <= present:
            reps.append((f"{layer}_avg", f"{layer}_max"))
    for a, b in (("block3_pool_avg", "block4_pool_avg"), ("block4_pool_avg", "block5_pool_avg")):
        if {a, b} <= present:
            reps.append((a, b))
    return reps


def grow(pool_at, search: Search, steps, budget_rows: int, first: Pool | None = None, progress=None):
    """`fit`'s rule for K: copies 0..k step by step (`steps`, e.g. 0, 2, 5, 10, ...), while the last step's
    out-of-fold gain at the chosen representation is above its standard error (paired over photos) and the next
    step's rows ((k + 1) x photos) fit `budget_rows`. `pool_at(k)` gives the pool with copies 0..k (extracting
    them if need be). Stage 1 (the representation, at K = 0) runs once; each later step re-selects K among the
    steps reached, at that representation. Returns the selection at the last step (its K: the smallest within
    one SE of the best), the steps reached, that step's pool, and one history entry per step."""
    history, reached, stage1, prev, k = [], [], None, None, 0
    pool = first if first is not None else pool_at(0)
    while True:
        reached.append(k)
        reps = search.representations if stage1 is None else (stage1.chosen.taps,)
        sel = select(pool, np.arange(pool.n_photos), replace(search, representations=reps, copies=tuple(reached)))
        stage1 = stage1 or sel
        here = max((c for c in sel.correct_by if c.taps == stage1.chosen.taps and c.copies == k),
                   key=lambda c: (sel.correct_by[c].mean(), -c.C))
        entry = {"copies": k, "rows": (k + 1) * pool.n_photos, "photos": pool.n_photos,
                 "accuracy": float(sel.correct_by[here].mean()), "C": here.C, "representation": "+".join(here.taps)}
        if prev is not None:
            d = sel.correct_by[here].astype(float) - sel.correct_by[prev]
            entry.update(gain=float(d.mean()), gain_se=float(d.std(ddof=1) / np.sqrt(len(d))))
        history.append(entry)
        if progress is not None:
            progress(entry)
        if prev is not None and entry["gain"] <= entry["gain_se"]:
            break  # this step did not help beyond its noise: no further copies
        nxt = next((s for s in steps if s > k), None)
        if nxt is None or (nxt + 1) * pool.n_photos > budget_rows:
            break
        prev, k = here, nxt
        pool = pool_at(k)
    # the final choice keeps stage 1's representation and its runner-up (stage 1 ran once, at K = 0)
    sel.runner_up, sel.paired_difference, sel.paired_se = stage1.runner_up, stage1.paired_difference, stage1.paired_se
    sel.scores = {**stage1.scores, **sel.scores}
    return sel, reached, pool, history
