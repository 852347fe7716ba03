"""fit's cross-fitted selection: folds of photos (a copy never leaves its original's fold), an estimate that
does not flatter on shuffled labels, and the informative representation found when there is one."""

import numpy as np
import pytest

from convcache.train import crossfit
from convcache.train.crossfit import Candidate, Pool, Search, default_representations, nested, photo_folds, select


def synthetic_pool(n_photos=600, copies=2, seed=0, signal=2.0, shuffle=False) -> Pool:
    """Photos with three taps: `useful` separates the two classes (each copy a noisy version of its photo),
    `noise` and `weak` do not (weak barely). Shuffled labels keep the features and permute the labels."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n_photos)
    base = {"useful": rng.normal(size=(n_photos, 8)) + signal * y[:, None] * np.eye(8)[0],
            "weak": rng.normal(size=(n_photos, 8)) + 0.1 * y[:, None],
            "noise": rng.normal(size=(n_photos, 32))}
    if shuffle:
        y = rng.permutation(y)
    rows = [(p, c) for c in range(copies + 1) for p in range(n_photos)]
    photo = np.array([p for p, _ in rows])
    copy = np.array([c for _, c in rows])
    feats = {t: (v[photo] + 0.3 * rng.normal(size=(len(rows), v.shape[1])) * (copy[:, None] > 0)).astype(np.float32)
             for t, v in base.items()}
    return Pool(feats, y[photo], photo, copy)


def test_folds_are_made_of_photos_and_copies_never_straddle_them():
    pool = synthetic_pool(n_photos=90, copies=3)
    photos = np.arange(pool.n_photos)
    folds = photo_folds(pool, photos, 5, seed=0)
    assert sorted(np.concatenate(folds).tolist()) == photos.tolist()  # each photo in exactly one fold
    for test in folds:
        train = np.setdiff1d(photos, test)
        train_rows, test_rows = pool.rows(train, 3), pool.rows(test, 3)
        assert not set(pool.photo[train_rows]) & set(pool.photo[test_rows])
        assert len(test_rows) == 4 * len(test)  # every copy of a test photo is on the test side


def test_no_fit_ever_sees_a_row_of_a_photo_it_is_scored_on(monkeypatch):
    """Instrumented: every probe fit during the nested loop, inner and outer, trains on rows whose photos are
    disjoint from the photos it is then scored on."""
    pool = synthetic_pool(n_photos=120, copies=2)
    real = crossfit.correct
    calls = []

    def checked(p, cand, train, test):
        rows = p.rows(train, cand.copies)
        assert not set(p.photo[rows].tolist()) & set(test.tolist()), "a copy of a scored photo was trained on"
        calls.append(cand)
        return real(p, cand, train, test)

    monkeypatch.setattr(crossfit, "correct", checked)
    est = nested(pool, Search(default_representations(["useful", "weak", "noise"]), Cs=(0.1,), copies=(0, 2)), 3)
    assert est.n == 120 and len(calls) > 3 * 3 * 3  # outer refits and every inner fit went through the check


def test_shuffled_labels_give_chance_with_an_interval_that_contains_it():
    """The negative control: a wide search (3 taps, their concatenations, 3 Cs, K in 0, 2) on labels shuffled
    against the features. The printed estimate must not flatter: within 3 points of chance, CI containing it."""
    pool = synthetic_pool(n_photos=2000, copies=2, shuffle=True, seed=1)
    reps = default_representations(["useful", "weak", "noise"]) + [("useful", "weak", "noise")]
    est = nested(pool, Search(reps, copies=(0, 2), n_folds=3, seed=0), 5)
    lo, hi = est.interval()
    assert est.n == 2000 and lo <= 0.5 <= hi and abs(est.accuracy - 0.5) <= 0.03, (est.accuracy, lo, hi)


def test_the_informative_representation_is_chosen_and_the_estimate_is_high():
    pool = synthetic_pool(n_photos=400, copies=2, seed=2)
    sel = select(pool, np.arange(pool.n_photos), Search(default_representations(["weak", "noise", "useful"]),
                                                        copies=(0, 2)))
    assert "useful" in sel.chosen.taps and sel.runner_up is not None and "useful" not in sel.runner_up.taps
    assert sel.paired_difference > 0.2  # useful vs the best representation without it
    est = nested(pool, Search(default_representations(["weak", "noise", "useful"]), copies=(0, 2)), 3)
    assert est.accuracy > 0.75 and all("useful" in c.taps for c in est.chosen)


def test_k_is_the_smallest_within_one_standard_error_of_the_best():
    """Copies that add nothing (exact replicas of the original; C large, so that repeating rows does not act as
    weaker regularisation) are not kept: K stays 0."""
    pool = synthetic_pool(n_photos=300, copies=2, seed=3)
    for t in pool.features:  # copies identical to their originals: no information added
        first = {p: r for r, p in enumerate(pool.photo) if pool.copy[r] == 0}
        pool.features[t] = pool.features[t][[first[p] for p in pool.photo]]
    sel = select(pool, np.arange(pool.n_photos), Search([("useful",)], Cs=(100.0,), copies=(0, 2)))
    assert sel.chosen.taps == ("useful",) and sel.chosen.copies == 0
    with pytest.raises(ValueError):  # every photo needs its original
        Pool({"a": np.zeros((2, 1))}, np.array([0, 1]), np.array([0, 1]), np.array([0, 1]))


def test_the_c_grid_grows_while_the_best_c_sits_at_its_edge():
    """Every representation is judged at its own best C: a grid whose best value is its edge is extended by
    decades (here from C = 1000 alone, down to where the accuracy stops improving)."""
    pool = synthetic_pool(n_photos=200, copies=0, seed=4)
    sel = select(pool, np.arange(pool.n_photos), Search([("useful", "weak", "noise")], Cs=(1000.0,)))
    tried = sorted(float(n.split("C=")[1].split()[0]) for n in sel.scores)
    assert tried[0] < 1000.0 and sel.chosen.C < 1000.0  # grown downwards
    # stopped where the lower edge is no longer strictly better than its neighbour
    edge, above = (sel.scores[Candidate(sel.chosen.taps, c, 0).name][0] for c in tried[:2])
    assert sel.chosen.C > tried[0] or edge == above
    assert sel.chosen == Candidate(("useful", "weak", "noise"), sel.chosen.C, 0)


def test_a_tie_at_the_lower_edge_does_not_walk_the_grid_down():
    """Ties go to the smaller C, but only a lower edge strictly better than its neighbour grows the grid: a flat
    score (every C equal, as at chance) stops at once instead of walking to C_RANGE's floor; a score that keeps
    improving downwards does walk."""
    from convcache.train.crossfit import tune_c

    asked = []

    def flat(c):
        asked.append(c.C)
        return 0.5

    assert tune_c(flat, ("a",), 0, (0.01, 0.1, 1.0)).C == 0.01
    assert min(asked) == 0.01
    assert tune_c(lambda c: -c.C, ("a",), 0, (0.01, 0.1, 1.0)).C == 1e-6  # strictly better all the way down


def test_grow_stops_when_a_step_adds_nothing_and_never_passes_the_budget():
    """fit's rule for K on a pool whose copies are exact replicas: K = 2 gains nothing, so the growth stops at
    steps (0, 2) and keeps K = 0; a budget below the next step's rows stops before extracting it."""
    from convcache.train.crossfit import grow

    pool = synthetic_pool(n_photos=200, copies=5, seed=5)
    first = {p: r for r, p in enumerate(pool.photo) if pool.copy[r] == 0}
    for t in pool.features:
        pool.features[t] = pool.features[t][[first[p] for p in pool.photo]]
    asked = []

    def pool_at(k):
        asked.append(k)
        return pool.upto(k)

    search = Search([("useful",), ("noise",)], Cs=(100.0,))
    sel, steps, got, history = grow(pool_at, search, (0, 2, 5), budget_rows=10_000)
    assert steps == [0, 2] and asked == [0, 2] and sel.chosen.copies == 0 and got.max_copy == 2
    assert history[1]["gain"] <= history[1]["gain_se"]
    sel, steps, _, _ = grow(pool_at, search, (0, 2, 5), budget_rows=599)  # 3 x 200 rows would not fit
    assert steps == [0] and pool.upto(2).max_copy == 2 and pool.upto(0).max_copy == 0
