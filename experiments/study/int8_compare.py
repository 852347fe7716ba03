"""The study's arms on an fp32 vs an int8 extractor, paired over the same report-half photos.

    D=../shared/data/cats_and_dogs_small
    C="--data $D --copies 0 2 --epochs 10 --seeds 0 1 2 --real-epochs 0"
    convcache compare $C --extractor runs/study/block5.onnx --store runs/study/block5.zarr -o runs/int8cmp/fp32
    convcache compare $C --extractor runs/rt/block5-int8-all.onnx -o runs/int8cmp/int8
    .venv/bin/python experiments/study/int8_compare.py runs/int8cmp/fp32 runs/int8cmp/int8 --json docs/results_int8.json

Each arm's per-image correctness is averaged over its seeds and aligned by photo (sha256); the
difference int8 - fp32 comes with a paired bootstrap over photos (95% interval, two-sided p) and the
per-seed differences (same seed = same initial weights, batch order and dropout masks) with a paired t
test over seeds: the photo bootstrap ignores seed-to-seed variance, the seed test ignores photo sampling,
so a difference is claimed only where both agree.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from convcache.stats import paired_bootstrap


def arms(folder: Path) -> dict:
    out = {}
    for path in sorted((folder / "arms").glob("*/seed*/metrics.json")):
        m = json.loads(path.read_text())
        out.setdefault(path.parent.parent.name, {})[m["seed"]] = {
            "accuracy": m["report"]["accuracy"],
            "correct": dict(zip(m["report_sha256"], np.asarray(m["report_correct"], float)))}
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("fp32")
    p.add_argument("int8")
    p.add_argument("--json")
    args = p.parse_args()
    a, b = arms(Path(args.fp32)), arms(Path(args.int8))
    rows = {}
    from scipy.stats import ttest_rel

    print("| arm | fp32 (seeds) | int8 (seeds) | int8 - fp32, points | 95% CI (photos) | p (photos) | per seed "
          "| p (seeds, paired t) |")
    print("|---|---|---|---|---|---|---|---|")
    for name in sorted(set(a) & set(b)):
        seeds = sorted(set(a[name]) & set(b[name]))
        shas = sorted(set.intersection(*(set(a[name][s]["correct"]) & set(b[name][s]["correct"]) for s in seeds)))
        fa = np.mean([[a[name][s]["correct"][h] for h in shas] for s in seeds], 0)
        fb = np.mean([[b[name][s]["correct"][h] for h in shas] for s in seeds], 0)
        test = paired_bootstrap(fa, fb)
        per_seed = [100 * (b[name][s]["accuracy"] - a[name][s]["accuracy"]) for s in seeds]
        acc_a = [100 * a[name][s]["accuracy"] for s in seeds]
        acc_b = [100 * b[name][s]["accuracy"] for s in seeds]
        p_seeds = float(ttest_rel(acc_b, acc_a).pvalue) if len(seeds) > 2 and np.std(per_seed) > 0 else None
        rows[name] = {"seeds": seeds, "photos": len(shas), "fp32": acc_a, "int8": acc_b, "per_seed_diff": per_seed,
                      "p_seeds_paired_t": p_seeds, **{k: v for k, v in test.items()}}
        lo, hi = (100 * x for x in test["ci95"])
        print(f"| {name.replace('_', ' ')} | {np.mean(acc_a):.1f} ± {np.std(acc_a, ddof=1) if len(seeds) > 1 else 0:.1f} "
              f"| {np.mean(acc_b):.1f} ± {np.std(acc_b, ddof=1) if len(seeds) > 1 else 0:.1f} "
              f"| {100 * test['diff']:+.1f} | [{lo:+.1f}, {hi:+.1f}] | {test['p']:.2f} "
              f"| {', '.join(f'{d:+.1f}' for d in per_seed)} | {'–' if p_seeds is None else f'{p_seeds:.2f}'} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=float) + "\n")


if __name__ == "__main__":
    main()
