"""Study plan 2 (docs/study_plan.md, issue 28): the layer and K, cross-fitted over every shared photo.

Stage A: every representation at K = 0; stage B: K in {0, 2, 5, 10} for the four representations the plan
fixes; stage C: at stage A's best representation, method 1 (the book's dense head on originals) and method 2
(the same head replaying copies 1..10), each stopped by the plan's rule on an inner 20% of the outer-training
photos. Stage B also runs stage A's winner (first; deviation 1 in docs/results.md: endpoint 3 needs the probe
at that representation's K). Stage F: `fit`'s own procedure at its defaults (`crossfit.grow` under the
23,000-row budget, then its nested estimate), one run per seed. For each (representation, K, seed): 5 outer folds over the 3,000 photos (seed = fold assignment); in
each, C chosen by inner 3-fold cross-validation on the outer-training photos (accuracy on originals), the
probe refit there and scored on the outer fold's originals. One JSON line per (stage, representation, K,
seed) in OUT/runs.jsonl: every photo's 0/1 (in photo order, with the photos' sha256 and split written once to
OUT/photos.json), the C chosen per fold, seconds, CPU. Resumable: finished lines are skipped.

    .venv/bin/python experiments/study/layers.py run --store runs/layers/taps.zarr --stage A -o runs/layers
    .venv/bin/python experiments/study/layers.py run --store runs/layers/taps.zarr --stage B -o runs/layers
    .venv/bin/python experiments/study/layers.py run --store runs/layers/taps.zarr --stage C -o runs/layers
    .venv/bin/python experiments/study/layers.py run --store runs/layers/taps.zarr --stage F -o runs/layers
    .venv/bin/python experiments/study/layers.py summary -o runs/layers
    .venv/bin/python experiments/study/layers_report.py -o runs/layers --store runs/layers/taps.zarr
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from convcache.runtime import cpu_model
from convcache.train.crossfit import Candidate, Pool, correct, default_representations, oof, photo_folds, tune_c

CS = (0.01, 0.1, 1.0)
SEEDS = (0, 1, 2, 3, 4)
STAGE_B = (("block5_pool",), ("block5_pool_avg",), ("block4_pool_avg",), ("block4_pool_avg", "block5_pool_avg"))
KS = (0, 2, 5, 10)


def crossfit_fixed(pool: Pool, taps: tuple, k: int, seed: int) -> tuple[np.ndarray, list]:
    """Every photo's 0/1 from the outer fold that held it out; C by inner CV on the rest."""
    photos = np.arange(pool.n_photos)
    got, chosen = np.zeros(pool.n_photos, np.int8), []
    for i, test in enumerate(photo_folds(pool, photos, 5, seed)):
        train = np.setdiff1d(photos, test)
        inner = photo_folds(pool, train, 3, seed * 100 + i + 1)
        scores = {}

        def score(c, train=train, inner=inner, scores=scores):
            if c not in scores:
                scores[c] = float(oof(pool, c, train, inner).mean())
            return scores[c]

        best = tune_c(score, taps, k, CS).C
        chosen.append(best)
        got[test] = correct(pool, Candidate(taps, best, k), train, test)
    return got, chosen


def dense_fixed(pool: Pool, taps: tuple, method: int, seed: int) -> tuple[np.ndarray, list]:
    """Method 1 (originals every epoch) or method 2 (copy (e mod 10) + 1 at epoch e): the book's head on
    standardised features (RMSprop 2e-5, batch 20), at most 150 epochs, patience 15 on the loss of an inner 20%
    of the outer-training photos (by content); the epoch with the lowest inner loss kept."""
    from sklearn.model_selection import train_test_split

    from convcache.train.heads import DenseHead

    photos = np.arange(pool.n_photos)
    got, epochs = np.zeros(pool.n_photos, np.int8), []
    for i, test in enumerate(photo_folds(pool, photos, 5, seed)):
        train = np.setdiff1d(photos, test)
        fit_p, stop_p = train_test_split(train, test_size=0.2, random_state=seed * 100 + i,
                                         stratify=pool.photo_label[train])
        rows = pool.rows(np.sort(fit_p), 10 if method == 2 else 0)
        stop_rows, test_rows = pool.originals(np.sort(stop_p)), pool.originals(test)
        head = DenseHead(epochs=150, patience=15, learning_rate=2e-5, batch_size=20, schedule="replay",
                         standardize=True, seed=seed).fit(
            pool.matrix(taps, rows), pool.label[rows], pool.matrix(taps, stop_rows), pool.label[stop_rows],
            image=np.unique(pool.photo[rows], return_inverse=True)[1], copy=pool.copy[rows])
        got[test] = head.predict(pool.matrix(taps, test_rows)) == pool.label[test_rows]
        epochs.append(int(head.best_epoch_))
    return got, epochs


def fit_procedure(pool: Pool, seed: int) -> tuple[np.ndarray, dict]:
    """`fit`'s own procedure at its defaults, seeded by `seed` (its --seed): K grown by `crossfit.grow` under the
    default budget (copies already in the store stand in for extraction), then the nested estimate fit prints
    (outer folds seeded by `seed`). Returns every photo's 0/1 from the nested estimate, and what fit chose."""
    from dataclasses import fields

    from convcache.pipeline.fit import FitConfig
    from convcache.train.crossfit import Search, grow, nested

    d = {f.name: f.default for f in fields(FitConfig) if f.name in ("steps", "Cs", "budget_rows", "outer_folds",
                                                                   "inner_folds")}
    search = Search(default_representations(list(pool.features)), d["Cs"], (0,), d["inner_folds"], seed)
    sel, steps, at, history = grow(pool.upto, search, d["steps"], d["budget_rows"])
    est = nested(at, replace(search, copies=tuple(steps)), d["outer_folds"])
    lo, hi = est.interval()
    return est.correct, {"final": sel.chosen.name, "final_taps": list(sel.chosen.taps), "final_K": sel.chosen.copies,
                         "steps": steps, "per_fold": [c.name for c in est.chosen], "printed": est.accuracy,
                         "ci95": [lo, hi], "history": history}


def best_of_stage_a(out: Path, seeds=SEEDS) -> tuple:
    means = {}
    for r in _read(out / "runs.jsonl"):
        if r["stage"] == "A":
            means.setdefault(r["representation"], []).append(r["accuracy"])
    if not means or min(len(v) for v in means.values()) < len(seeds):
        raise SystemExit("stage C needs stage A finished (every representation, every seed)")
    return tuple(max(means, key=lambda k: (np.mean(means[k]), -k.count("+"))).split("+"))


def run(args) -> None:
    from convcache.store import FeatureStore

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    fs = FeatureStore(args.store)
    max_copy = 0 if args.stage == "A" else max(KS)
    chosen = best_of_stage_a(out, args.seeds) if args.stage == "C" else None
    pool = Pool.from_store(fs, splits=["train", "validation"], max_copy=max_copy)
    photos = out / "photos.json"
    if not photos.is_file():  # which photo each position is (pooled order: train, then validation)
        meta = []
        for split in ("train", "validation"):
            d = fs.load(split, max_copy=0, with_features=False)
            meta += [{"sha256": s, "split": split, "label": int(y)} for s, y in zip(d.sha256, d.label)]
        photos.write_text(json.dumps(meta))
    runs = out / "runs.jsonl"
    done = {(r["stage"], r["representation"], r["copies"], r["seed"]) for r in _read(runs)}
    if args.stage == "B":  # deviation 1 (docs/results.md): stage A's winner joins the plan's four, first
        chosen = best_of_stage_a(out, args.seeds)
    arms = {"A": [(tuple(r), 0) for r in default_representations(list(pool.features))],
            "B": [(r, k) for r in dict.fromkeys((chosen,) + STAGE_B[:0:-1] + STAGE_B[:1])
                  if all(t in pool.features for t in r) for k in KS] if chosen else [],
            "C": [(chosen, "method1"), (chosen, "method2")], "F": [(("fit",), "fit")]}[args.stage]
    # representation-major for B (the book's map, the slowest at K = 10, last); seed-major otherwise
    order = [(seed, a) for a in arms for seed in args.seeds] if args.stage == "B" else \
        [(seed, a) for seed in args.seeds for a in arms]
    for seed, (taps, k) in order:
        key = (args.stage, "+".join(taps), k, seed)
        if key in done:
            continue
        t0 = time.perf_counter()
        if args.stage == "C":
            got, extra = dense_fixed(pool, taps, 1 if k == "method1" else 2, seed)
        elif args.stage == "F":
            got, extra = fit_procedure(pool, seed)
        else:
            got, extra = crossfit_fixed(pool, taps, k, seed)
        line = {"stage": args.stage, "representation": "+".join(taps), "copies": k, "seed": seed,
                "correct": "".join(map(str, got.tolist())), "accuracy": float(got.mean()),
                {"C": "best_epochs", "F": "fit"}.get(args.stage, "C"): extra,
                "seconds": round(time.perf_counter() - t0, 1), "cpu": cpu_model()}
        with runs.open("a") as f:
            f.write(json.dumps(line) + "\n")
        print(f"{args.stage} {key[1]} K={k} seed {seed}: {100 * got.mean():.1f}% ({line['seconds']} s)", flush=True)


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def summary(args) -> None:
    """Mean accuracy per arm over the seeds finished so far (all photos, and the validation photos)."""
    out = Path(args.output)
    meta = json.loads((out / "photos.json").read_text())
    val = np.array([m["split"] == "validation" for m in meta])
    arms = {}
    for r in _read(out / "runs.jsonl"):
        c = np.frombuffer(r["correct"].encode(), np.uint8) - 48
        arms.setdefault((r["stage"], r["representation"], r["copies"]), []).append((c.mean(), c[val].mean()))
    for (stage, rep, k), v in sorted(arms.items()):
        a = np.array(v)
        print(f"{stage} {rep:40s} K={k!s:>7} seeds={len(v)} all {100 * a[:, 0].mean():.1f}% "
              f"validation {100 * a[:, 1].mean():.1f}%")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--store", required=True)
    r.add_argument("--stage", choices=["A", "B", "C", "F"], required=True)
    r.add_argument("-o", "--output", required=True)
    r.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), help="the plan's: 0 1 2 3 4")
    s = sub.add_parser("summary")
    s.add_argument("-o", "--output", required=True)
    a = p.parse_args()
    {"run": run, "summary": summary}[a.cmd](a)


if __name__ == "__main__":
    main()
