"""Endpoints and checks of the study at convergence (docs/study_plan.md), from experiments/study/converge.py's runs.

    converge_report.py OUT --costs COSTS.json [--real REF/metrics.json] -o docs/results_converge.json

COSTS.json: the quiet per-unit costs from experiments/bench_method2_cost.py (extraction ms per cached row, end-to-end
ms per training and per validation image, a dense-head epoch on cached features), with the CPU model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from convcache.stats import paired_bootstrap, seed_photo_bootstrap

MARGIN = 0.015
THRESHOLDS = (0.70, 0.75, 0.80)
N_TRAIN, N_VAL = 2000, 1000


def _runs(out: Path, keys: list[str]) -> list[dict]:
    runs = [json.loads((out / "runs" / f"{k}.json").read_text()) for k in keys]
    return sorted(runs, key=lambda r: r["run"]["seed"])


def _arm(name: str, runs: list[dict]) -> dict:
    acc = np.array([r["report"]["accuracy"] for r in runs])
    return {"name": name, "k": runs[0]["run"]["k"], "setting": {k: runs[0]["run"][k] for k in
                                                                 ("preprocess", "standardize", "lr", "epochs",
                                                                  "patience")},
            "seeds": [r["run"]["seed"] for r in runs], "report_accuracy": acc.tolist(),
            "report_mean": float(acc.mean()), "report_sd": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
            "select_mean": float(np.mean([r["select"]["accuracy"] for r in runs])),
            "report_log_loss_mean": float(np.mean([r["report"]["log_loss"] for r in runs])),
            "best_epochs": [r["best_epoch"] for r in runs], "epochs_run": [r["epochs_run"] for r in runs],
            "copies_used": sorted({c for r in runs for c in r["copies_used"]}),
            "train_seconds_per_epoch": float(np.median([h["train_seconds"] for r in runs for h in r["history"]])),
            "fit_seconds_mean": float(np.mean([r["fit_seconds"] for r in runs])), "cpu": runs[0].get("cpu")}


def _curve(runs: list[dict]) -> list[float]:
    """Seed-mean report-half accuracy after each epoch, up to the longest run; a run that stopped early
    contributes its kept model (its selected epoch's accuracy) from then on, as its user would have it."""
    e = max(len(r["history"]) for r in runs)
    return [float(np.mean([r["history"][i]["report_accuracy"] if i < len(r["history"]) else r["report"]["accuracy"]
                           for r in runs])) for i in range(e)]


def _copies_used_by(k: int, epoch: int) -> int:
    """Copies a replay arm has trained on after `epoch` epochs: the originals for K=0, else copies 1..min(e, K)."""
    return 1 if k == 0 else min(epoch, k)


def _compute(k: int, epoch: int, costs: dict) -> float:
    """Seconds of a cached arm after `epoch` epochs: extraction of the copies used and of validation, plus the
    head's epochs."""
    return ((_copies_used_by(k, epoch) * N_TRAIN + N_VAL) * costs["extract_s_per_row"]
            + epoch * costs["head_epoch_s"])


def _e2e(epoch: int, costs: dict) -> dict:
    return {"train": epoch * N_TRAIN * costs["e2e_train_s_per_image"],
            "validation": epoch * N_VAL * costs["e2e_eval_s_per_image"]}


def analyse(out: Path, costs: dict, real: dict | None) -> dict:
    p1 = json.loads((out / "phase1.json").read_text())
    p2 = json.loads((out / "phase2.json").read_text())
    n = int(p2["n"])
    runs = {k: _runs(out, keys) for k, keys in p2["arms"].items()}
    ks = sorted(int(k) for k in runs if k.isdigit())
    shas = {tuple(r["report_sha256"]) for rs in runs.values() for r in rs}
    assert len(shas) == 1, "every run must report on the same photos in the same order"
    C = {k: {r["run"]["seed"]: r["report_correct"] for r in rs} for k, rs in runs.items()}

    def boot(a: str, b: str, margin=None) -> dict:
        """b - a over the seeds both arms ran (paired by seed and photo)."""
        seeds = sorted(set(C[a]) & set(C[b]))
        out = seed_photo_bootstrap(np.array([C[a][s] for s in seeds]), np.array([C[b][s] for s in seeds]),
                                   margin=margin)
        out["paired_seeds"] = seeds
        return out

    arms = {}
    for k in ks:
        name = "method 1 (K=0)" if k == 0 else (f"method 2 (K=N={n})" if k == n else f"K={k}")
        arms[str(k)] = _arm(name, runs[str(k)])
    if "method 1, steps matched" in runs:
        arms["method 1, steps matched"] = _arm("method 1, steps matched", runs["method 1, steps matched"])

    res = {"n": n, "margin": MARGIN, "phase1": p1["settings"], "phase1_cells": p1["cells"], "arms": arms,
           "costs": costs}
    res["method2_minus_method1"] = boot("0", str(n))
    # amendment 3: method 2 is converged when fewer than 3 of its seeds keep an epoch in the last 15 of N
    late = [e for e in arms[str(n)]["best_epochs"] if e > n - 15]
    res["method2_convergence"] = {"best_epochs": arms[str(n)]["best_epochs"], "epochs_run": arms[str(n)]["epochs_run"],
                                  "seeds_best_in_last_15": len(late), "converged": len(late) < 3}
    eq = {}
    for k in ks:
        if k != n:
            eq[str(k)] = boot(str(n), str(k), MARGIN)  # K - method 2
    if "method 1, steps matched" in C:
        eq["method 1, steps matched"] = boot(str(n), "method 1, steps matched", MARGIN)
        res["matched_minus_method1"] = boot("0", "method 1, steps matched")
    res["vs_method2"] = eq
    res["smallest_equivalent_k"] = next((k for k in ks if k != n and eq[str(k)]["equivalent"]), None)
    res["smallest_noninferior_k"] = next((k for k in ks if k != n and eq[str(k)]["noninferior"]), None)

    # post hoc, not pre-registered: method 2 at lr 2e-5 (experiments/study/sensitivity.py)
    sens = sorted((json.loads(p.read_text()) for p in (out / "runs").glob("*.json")), key=lambda r: r["run"]["seed"])
    sens = [r for r in sens if r["run"]["phase"] == "phase2-sensitivity"]
    if sens:
        S = np.array([r["report_correct"] for r in sens])
        seeds = [r["run"]["seed"] for r in sens]
        res["sensitivity_method2_lr2e-5"] = {
            **_arm("method 2 at lr 2e-5 (post hoc)", sens),
            "minus_method1": seed_photo_bootstrap(np.array([C["0"][s] for s in seeds]), S),
            "minus_method2_chosen": seed_photo_bootstrap(np.array([C[str(n)][s] for s in seeds]), S),
            "seeds_best_in_last_15": sum(r["best_epoch"] > n - 15 for r in sens)}

    # the linear probe comparator
    probes = {}
    for path in sorted((out / "probe").glob("*.json")) if (out / "probe").is_dir() else []:
        pr = json.loads(path.read_text())
        assert tuple(pr["report_sha256"]) in shas
        m2 = np.array([C[str(n)][s] for s in sorted(C[str(n)])])
        probes[f"K={pr['k']}"] = {"k": pr["k"], "C": pr["C"], "report": pr["report"]["accuracy"],
                                  "select": pr["select"]["accuracy"],
                                  "vs_method2_seed_mean": paired_bootstrap(m2.mean(0), pr["report_correct"]),
                                  # the probe is deterministic: method 2's seeds resampled, then photos
                                  "vs_method2_seeds_photos": seed_photo_bootstrap(
                                      m2, np.tile(np.array(pr["report_correct"]), (len(m2), 1))),
                                  "report_correct": pr["report_correct"]}
    res["probe"] = probes
    # the plan's rule: the probe becomes fit's default head only if it beats the recommended dense arm on the
    # report half with a 95% interval excluding 0 (both intervals above are asked to)
    winners = [p for p in probes.values() if p["vs_method2_seed_mean"]["ci95"][0] > 0
               and p["vs_method2_seeds_photos"]["ci95"][0] > 0]
    res["probe_becomes_default"] = max(winners, key=lambda p: p["report"])["k"] if winners else None

    # cost to reach 70/75/80% (seed-mean report-half accuracy after each epoch, against compute)
    curves, reach = {}, {}
    for key, rs in list(runs.items()):
        if not key.isdigit():
            continue
        k = int(key)
        cur = _curve(rs)
        curves[key] = {"report_accuracy": cur, "compute_s": [_compute(k, e + 1, costs) for e in range(len(cur))]}
        reach[key] = {}
        for t in THRESHOLDS:
            e = next((i + 1 for i, a in enumerate(cur) if a >= t), None)
            reach[key][str(t)] = None if e is None else {"epoch": e, "compute_s": _compute(k, e, costs)}
    cur = curves[str(n)]["report_accuracy"]
    curves["method 2 end to end"] = {"report_accuracy": cur,
                                     "compute_s": [_e2e(e + 1, costs)["train"] for e in range(len(cur))],
                                     "validation_s": [_e2e(e + 1, costs)["validation"] for e in range(len(cur))]}
    reach["method 2 end to end"] = {}
    for t in THRESHOLDS:
        e = next((i + 1 for i, a in enumerate(cur) if a >= t), None)
        reach["method 2 end to end"][str(t)] = None if e is None else {"epoch": e, **_e2e(e, costs),
                                                                       "compute_s": _e2e(e, costs)["train"]}
    res["curves"], res["cost_to_reach"] = curves, reach

    # replaying method 2 from the cache vs running it end to end, for 1, 4 and 10 experiments
    epochs = float(np.mean(arms[str(n)]["epochs_run"]))
    copies = min(max(arms[str(n)]["epochs_run"]), n)  # the copies method 2 trained on (1..epochs)
    extract_once = (copies * N_TRAIN + N_VAL) * costs["extract_s_per_row"]
    ratios = {}
    for x in (1, 4, 10):
        cached = extract_once + x * epochs * costs["head_epoch_s"]
        e2e = x * _e2e(epochs, costs)["train"]
        e2e_val = x * (_e2e(epochs, costs)["train"] + _e2e(epochs, costs)["validation"])
        ratios[str(x)] = {"cached_s": cached, "end_to_end_train_s": e2e, "end_to_end_with_validation_s": e2e_val,
                          "ratio_train_only": e2e / cached, "ratio_with_validation": e2e_val / cached}
    res["replay_vs_end_to_end"] = {"epochs_mean": epochs, "copies_extracted": copies, "by_experiments": ratios}
    rec = res["smallest_equivalent_k"] if res["smallest_equivalent_k"] is not None else res["smallest_noninferior_k"]
    rec = n if rec is None else rec
    res["recommended_k"] = rec
    r_ep = float(np.mean(arms[str(rec)]["epochs_run"]))
    rec_cost = (_copies_used_by(rec, int(round(r_ep))) * N_TRAIN + N_VAL) * costs["extract_s_per_row"] \
        + r_ep * costs["head_epoch_s"]
    res["recommended_vs_method2_end_to_end"] = {
        "recommended_compute_s": rec_cost, "method2_end_to_end_s": _e2e(epochs, costs)["train"],
        "ratio": _e2e(epochs, costs)["train"] / rec_cost,
        "ratio_4_experiments": 4 * _e2e(epochs, costs)["train"] / (
            (_copies_used_by(rec, int(round(r_ep))) * N_TRAIN + N_VAL) * costs["extract_s_per_row"]
            + 4 * r_ep * costs["head_epoch_s"])}

    # swap the halves: epochs chosen on the report half, accuracy on the select half (runs as they were stopped)
    swap = {}
    for key, rs in runs.items():
        accs = []
        for r in rs:
            h = min(r["history"], key=lambda h: h["report_loss"])
            accs.append(h["select_accuracy"])
        swap[key] = {"select_accuracy_at_report_chosen_epoch": accs, "mean": float(np.mean(accs))}
    d = np.array(swap[str(n)]["select_accuracy_at_report_chosen_epoch"]) - np.array(
        swap["0"]["select_accuracy_at_report_chosen_epoch"])  # both arms ran seeds 0-4
    swap["method2_minus_method1"] = {"per_seed": d.tolist(), "mean": float(d.mean()),
                                     "sd": float(d.std(ddof=1)) if len(d) > 1 else 0.0}
    for k in ks:
        if k != n:
            dk = np.array(swap[str(k)]["select_accuracy_at_report_chosen_epoch"]) - np.array(
                swap[str(n)]["select_accuracy_at_report_chosen_epoch"])
            swap[f"K={k} minus method 2"] = {"mean": float(dk.mean()), "per_seed": dk.tolist()}
    cells = p1.get("cells", {})
    swapped_settings = {}
    for k in {c["k"] for c in cells.values()}:
        best = None
        for c in cells.values():
            if c["k"] != k:
                continue
            for lr, _ in c["by_lr"].items():
                run = _phase1_run(out, c, float(lr))
                if run is None:
                    continue
                loss = min(h["report_loss"] for h in run["history"])
                if best is None or loss < best[0]:
                    best = (loss, c["preprocess"], c["standardize"], float(lr))
        if best:
            swapped_settings[str(k)] = {"preprocess": best[1], "standardize": best[2], "lr": best[3],
                                        "report_loss": best[0]}
    swap["phase1_settings_chosen_on_report_half"] = swapped_settings
    res["swap"] = swap
    if real:
        res["real_method2"] = real
    return res


def _phase1_run(out: Path, cell: dict, lr: float) -> dict | None:
    for path in (out / "runs").glob("*.json"):
        r = json.loads(path.read_text())
        q = r["run"]
        if q["phase"] == "phase1" and q["preprocess"] == cell["preprocess"] and q["standardize"] == cell[
                "standardize"] and q["k"] == cell["k"] and abs(q["lr"] - lr) < 1e-15:
            return r
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--costs", required=True)
    p.add_argument("--real", help="the real TensorFlow method-2 comparison (JSON)")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--raw", help="also write every run (settings, per-epoch history, per-photo correctness) here, "
                                 "gzipped JSON")
    a = p.parse_args()
    costs = json.loads(Path(a.costs).read_text())
    real = json.loads(Path(a.real).read_text()) if a.real else None
    res = analyse(Path(a.out), costs, real)
    Path(a.output).write_text(json.dumps(res, indent=1, sort_keys=True) + "\n")
    if a.raw:
        import gzip

        runs = [json.loads(p.read_text()) for p in sorted((Path(a.out) / "runs").glob("*.json"))]
        shas = runs[0]["report_sha256"]
        for r in runs:
            assert r.pop("report_sha256") == shas
        probes = [json.loads(p.read_text()) for p in sorted((Path(a.out) / "probe").glob("*.json"))]
        for r in probes:
            r.pop("report_sha256", None)
        with gzip.open(a.raw, "wt") as f:
            json.dump({"report_sha256": shas, "runs": runs, "probes": probes}, f, separators=(",", ":"))
    print(json.dumps({k: res[k] for k in ("n", "smallest_equivalent_k", "smallest_noninferior_k", "recommended_k")}))


if __name__ == "__main__":
    main()
