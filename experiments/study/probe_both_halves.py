"""The probe's lead over method 2 on each validation half and on both together (issue 28's audit of
docs/results.md), from the committed per-photo runs (docs/results_converge_runs.json.gz): the standardised
linear probe on copies 0..10 (deterministic) against method 2 (K = N = 60, its phase-1 setting, 5 seeds),
paired by photo, method 2's seeds then photos resampled (`stats.seed_photo_bootstrap`).

    .venv/bin/python experiments/study/probe_both_halves.py
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import numpy as np

from convcache.stats import seed_photo_bootstrap

RUNS = Path(__file__).resolve().parents[2] / "docs" / "results_converge_runs.json.gz"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default=str(RUNS))
    p.add_argument("--lr", type=float, default=6.3e-6, help="method 2's phase-1 learning rate")
    a = p.parse_args()
    d = json.load(gzip.open(a.runs))
    m2 = sorted((r for r in d["runs"] if r["run"]["phase"] == "phase2" and r["run"]["k"] == 60
                 and abs(r["run"]["lr"] - a.lr) < 1e-12 and not r["run"].get("matched")),
                key=lambda r: r["run"]["seed"])
    probe = next(pr for pr in d["probes"] if pr["k"] == 10)
    out = {"method2_seeds": [r["run"]["seed"] for r in m2], "method2_lr": a.lr}
    for half in ("report", "select", "both"):
        names = ("report_correct", "select_correct") if half == "both" else (f"{half}_correct",)
        b = np.array([np.concatenate([r[n] for n in names]) for r in m2], float)
        pr = np.concatenate([probe[n] for n in names]).astype(float)
        res = seed_photo_bootstrap(b, np.tile(pr, (len(b), 1)))
        out[half] = {"photos": int(b.shape[1]), "probe": float(pr.mean()), "method2": float(b.mean()),
                     "diff_points": round(100 * res["diff"], 2), "ci95_points": [round(100 * x, 2) for x in res["ci95"]]}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
