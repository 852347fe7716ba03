"""logreg fit time at the issue's scale (22,000 x 8,192) and a head epoch against an end-to-end epoch.

    .venv/bin/python experiments/bench_train.py --store runs/cats-hed/features.zarr --results runs/cats-hed/results.json

The 22,000 rows are the store's real train rows (originals + copies), tiled with a little noise.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from convcache.train.data import load_training_data
from convcache.train.heads import LogRegHead


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--store", default="runs/cats-hed/features.zarr")
    p.add_argument("--results", default="runs/cats-hed/results.json")
    p.add_argument("--rows", type=int, default=22_000)
    a = p.parse_args()
    data = load_training_data(a.store)
    X, y = data.train.X, data.train.y
    reps = int(np.ceil(a.rows / len(y)))
    rng = np.random.default_rng(0)
    X = np.tile(X, (reps, 1))[: a.rows]
    X += rng.normal(0, 0.01 * X.std(), X.shape).astype(np.float32)
    y = np.tile(y, reps)[: a.rows]
    print(f"| logreg fit on {X.shape[0]:,} x {X.shape[1]:,} | seconds | validation accuracy |")
    print("|---|---|---|")
    for Cs in ((0.0003,), LogRegHead().Cs):
        head = LogRegHead(Cs=Cs)
        t = time.perf_counter()
        head.fit(X, y, data.validation.X, data.validation.y)
        acc = (head.predict(data.validation.X) == data.validation.y).mean()
        print(f"| {len(Cs)} C value(s) {list(Cs)} | {time.perf_counter() - t:.1f} | {100 * acc:.1f}% |")

    rows = json.load(open(a.results))["rows"]
    head = [r for r in rows if r["head"] == "dense" and r["method"].startswith("cached")]
    ref = [r for r in rows if r["method"].startswith("reference")]
    if head and ref:
        h = max(head, key=lambda r: r["train_rows"])
        r = max(ref, key=lambda r: r["seconds_per_epoch"])
        print(f"\n| epoch | rows | seconds | ratio |\n|---|---|---|---|\n"
              f"| dense head on cached features ({h['setting']}) | {h['train_rows']:,} | {h['seconds_per_epoch']:.2f} | 1 |\n"
              f"| end to end ({r['method']}) | 2,000 | {r['seconds_per_epoch']:.1f} | "
              f"{r['seconds_per_epoch'] / h['seconds_per_epoch']:.0f}x |")


if __name__ == "__main__":
    main()
