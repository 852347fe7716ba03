"""Study plan 2's endpoints and decision rules (docs/study_plan.md), from `layers.py`'s runs.

Reads OUT/runs.jsonl and OUT/photos.json (or their committed copies: docs/layers/runs.jsonl.gz and
docs/layers/photos.json), computes every endpoint the plan fixed (paired differences by
`stats.seed_photo_bootstrap`, 10,000 resamples, seeds then photos; equivalence within 1 point by TOST) and
writes docs/results_layers.md and docs/layers/endpoints.json. Arms with fewer than the plan's 5 seeds are listed
with their seed count and take part in no comparison.

    .venv/bin/python experiments/study/layers_report.py -o runs/layers --store runs/layers/taps.zarr
    .venv/bin/python experiments/study/layers_report.py -o docs/layers   # from the committed raw runs
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import numpy as np

from convcache.stats import seed_photo_bootstrap

SEEDS = 5
MARGIN = 0.01  # the plan's equivalence margin: 1 point
MAP = "block5_pool"  # the book's cut
KS = (0, 2, 5, 10)
THRESHOLDS = (0.75, 0.80, 0.85)
N_ORIGINALS = 3000


def read_runs(out: Path) -> list[dict]:
    for path in (out / "runs.jsonl", out / "runs.jsonl.gz"):
        if path.is_file():
            text = gzip.open(path, "rt").read() if path.suffix == ".gz" else path.read_text()
            return [json.loads(x) for x in text.splitlines() if x.strip()]
    raise SystemExit(f"{out}: no runs.jsonl(.gz)")


def arms_of(runs: list[dict]) -> dict:
    """(stage, representation, copies) -> {seed: run}."""
    arms: dict = {}
    for r in runs:
        arms.setdefault((r["stage"], r["representation"], r["copies"]), {})[r["seed"]] = r
    return arms


def matrix(arm: dict) -> np.ndarray:
    """(seeds, photos) 0/1, seeds in order."""
    return np.stack([np.frombuffer(arm[s]["correct"].encode(), np.uint8) - 48 for s in sorted(arm)]).astype(float)


def complete(arm: dict | None) -> bool:
    return arm is not None and len(arm) >= SEEDS


def pts(x: float) -> str:
    return f"{100 * x:+.1f}"


def diff_text(d: dict) -> str:
    lo, hi = d["ci95"]
    return f"{pts(d['diff'])} [{pts(lo)}, {pts(hi)}]"


def extraction_seconds_per_row(store: str | None) -> tuple[float | None, str]:
    if not store:
        return None, "not given"
    from convcache.store import FeatureStore

    fs = FeatureStore(store)
    rows = secs = 0
    cpus = set()
    for split in fs.splits:
        for run in fs.runs(split):
            rows += int(run.get("rows", 0) or 0)
            secs += float(run.get("seconds", 0) or 0)
            cpus.add(str(run.get("cpu", "?")))
    return (secs / rows if rows else None), ", ".join(sorted(cpus))


def report(out: Path, store: str | None, docs: Path) -> dict:
    runs = read_runs(out)
    meta = json.loads((out / "photos.json").read_text())
    val = np.array([m["split"] == "validation" for m in meta])
    arms = arms_of(runs)
    res: dict = {"photos": len(meta), "validation_photos": int(val.sum()), "margin": MARGIN}
    cpu = sorted({r.get("cpu", "?") for r in runs})
    res["cpu"] = cpu

    def acc(key) -> dict:
        m = matrix(arms[key])
        return {"all": float(m.mean()), "validation": float(m[:, val].mean()), "seeds": len(arms[key]),
                "per_seed": [float(x) for x in m.mean(axis=1)],
                "seconds_per_seed": float(np.mean([arms[key][s]["seconds"] for s in arms[key]]))}

    # endpoint 1: stage A
    a_keys = [k for k in arms if k[0] == "A"]
    stage_a = {k[1]: acc(k) for k in a_keys}
    res["stage_a"] = stage_a
    full_a = {r: v for r, v in stage_a.items() if v["seeds"] >= SEEDS}
    best = max(full_a, key=lambda r: (full_a[r]["all"], -r.count("+"))) if full_a else None
    res["stage_a_best"] = best
    if best and MAP in full_a and best != MAP:
        res["best_vs_map"] = seed_photo_bootstrap(matrix(arms[("A", MAP, 0)]), matrix(arms[("A", best, 0)]))

    # endpoint 2: stage B
    stage_b = {}
    for rep in sorted({k[1] for k in arms if k[0] == "B"}):
        row = {"by_k": {}, "vs_0": {}, "vs_10": {}}
        for k in KS:
            if ("B", rep, k) in arms:
                row["by_k"][k] = acc(("B", rep, k))
        ok = {k for k in KS if complete(arms.get(("B", rep, k)))}
        for k in sorted(ok - {0}):
            if 0 in ok:
                row["vs_0"][k] = seed_photo_bootstrap(matrix(arms[("B", rep, 0)]), matrix(arms[("B", rep, k)]))
        if 10 in ok:
            for k in sorted(ok - {10}):
                row["vs_10"][k] = seed_photo_bootstrap(matrix(arms[("B", rep, 10)]), matrix(arms[("B", rep, k)]),
                                                       margin=MARGIN)
            row["smallest_k_equivalent_to_10"] = next(
                (k for k in sorted(ok) if k == 10 or row["vs_10"][k]["equivalent"]), None)
        stage_b[rep] = row
    res["stage_b"] = stage_b

    # endpoint 3: stage C at stage A's winner
    c_rep = next((k[1] for k in arms if k[0] == "C"), None)
    stage_c = {}
    if c_rep:
        cand = {"method 1 (dense head, originals)": ("C", c_rep, "method1"),
                "method 2 (dense head, replayed copies 1..10)": ("C", c_rep, "method2"),
                "probe, K = 0": ("A", c_rep, 0)}
        kb = stage_b.get(c_rep, {}).get("smallest_k_equivalent_to_10")
        if kb is not None and kb != 0:
            cand[f"probe, K = {kb} (stage B)"] = ("B", c_rep, kb)
        got = {n: k for n, k in cand.items() if k in arms}
        stage_c = {"representation": c_rep, "arms": {n: acc(k) for n, k in got.items()}, "pairs": {}}
        names = [n for n in got if complete(arms[got[n]])]
        for i, x in enumerate(names):
            for y in names[i + 1:]:
                stage_c["pairs"][f"{y} - {x}"] = seed_photo_bootstrap(matrix(arms[got[x]]), matrix(arms[got[y]]))
        for n, k in got.items():
            if k[0] == "C":
                stage_c["arms"][n]["best_epochs"] = [e for s in sorted(arms[k]) for e in arms[k][s]["best_epochs"]]
    res["stage_c"] = stage_c

    # endpoint 4: cost to reach 75/80/85%
    per_row, ext_cpu = extraction_seconds_per_row(store)
    res["extraction_seconds_per_row"], res["extraction_cpu"] = per_row, ext_cpu
    costs = []
    for key, arm in arms.items():
        if key[0] == "F" or not complete(arm):
            continue
        k = key[2]
        rows = N_ORIGINALS * (11 if k == "method2" else 1 if k == "method1" else k + 1)
        a = acc(key)
        costs.append({"arm": f"{key[0]} {key[1]} K={k}", "rows": rows, "accuracy": a["all"],
                      "extract_min": rows * per_row / 60 if per_row else None,
                      "crossfit_min_per_seed": a["seconds_per_seed"] / 60})
    res["cost"] = {}
    for t in THRESHOLDS:
        hit = [c for c in costs if c["accuracy"] >= t]
        res["cost"][f"{int(100 * t)}%"] = min(hit, key=lambda c: (c["rows"], c["crossfit_min_per_seed"])) \
            if hit else None

    # endpoint 5: fit's printed accuracy against the cross-fitted accuracy of its own choices
    fits = arms.get(("F", "fit", "fit"), {})
    res["fit"] = []
    for s in sorted(fits):
        f = fits[s]["fit"]
        entry = {"seed": s, "printed": f["printed"], "ci95": f["ci95"], "final": f["final"], "steps": f["steps"],
                 "per_fold": f["per_fold"], "minutes": fits[s]["seconds"] / 60}
        own = arms.get(("B", "+".join(f["final_taps"]), f["final_K"])) or \
            (arms.get(("A", "+".join(f["final_taps"]), 0)) if f["final_K"] == 0 else None)
        if own and s in own:
            entry["own_choice_crossfitted"] = own[s]["accuracy"]
        res["fit"].append(entry)
    if len(fits) >= SEEDS:
        finals = [fits[s]["fit"]["final_taps"] for s in sorted(fits)]
        modal = max({tuple(x) for x in finals}, key=lambda t: finals.count(list(t)))
        ks = [fits[s]["fit"]["final_K"] for s in sorted(fits) if tuple(fits[s]["fit"]["final_taps"]) == modal]
        res["fit_modal"] = {"taps": "+".join(modal), "K": max(set(ks), key=ks.count),
                            "times": finals.count(list(modal))}

    res["rules"] = rules(res, arms)
    docs.mkdir(parents=True, exist_ok=True)
    return res


def rules(res: dict, arms: dict) -> dict:
    """The plan's three decision rules, evaluated (None where an arm they need is not complete)."""
    out = {}
    modal = res.get("fit_modal")
    if modal:
        mine = ("B", modal["taps"], modal["K"]) if ("B", modal["taps"], modal["K"]) in arms else \
            ("A", modal["taps"], 0) if modal["K"] == 0 else None
        beats = []
        if mine and complete(arms.get(mine)):
            for rep in res["stage_a"]:
                k = res["stage_b"].get(rep, {}).get("smallest_k_equivalent_to_10", 0) or 0
                other = ("B", rep, k) if ("B", rep, k) in arms else ("A", rep, 0)
                if rep == modal["taps"] or not complete(arms.get(other)):
                    continue
                d = seed_photo_bootstrap(matrix(arms[mine]), matrix(arms[other]))
                if d["diff"] > MARGIN and d["ci95"][0] > 0:
                    beats.append({"representation": rep, "K": k, **d})
            out["1_representation"] = {"fit_modal": modal, "beaten_by": beats, "fires": bool(beats)}
        t, k = modal["taps"], modal["K"]
        if complete(arms.get(("B", t, 10))) and complete(arms.get(("B", t, k))):
            d = seed_photo_bootstrap(matrix(arms[("B", t, k)]), matrix(arms[("B", t, 10)]))
            out["2_budget"] = {"K10_minus_fit_K": d, "fires": bool(d["diff"] > MARGIN and d["ci95"][0] > 0)}
    c = res.get("stage_c") or {}
    names = list(c.get("arms", {}))
    m2 = next((n for n in names if n.startswith("method 2")), None)
    probe = next((n for n in names if "stage B" in n), None) or next((n for n in names if n == "probe, K = 0"), None)
    if m2 and probe and f"{probe} - {m2}" in c["pairs"] or (m2 and probe and f"{m2} - {probe}" in c["pairs"]):
        key = f"{m2} - {probe}" if f"{m2} - {probe}" in c["pairs"] else None
        d = c["pairs"][key] if key else {**(p := c["pairs"][f"{probe} - {m2}"]), "diff": -p["diff"],
                                            "ci95": [-p["ci95"][1], -p["ci95"][0]]}
        out["3_dense_head"] = {"method2_minus_probe": d, "probe": probe,
                               "fires": bool(d["diff"] > MARGIN and d["ci95"][0] > 0)}
    return out


def markdown(res: dict) -> str:
    L = ["# Results of study plan 2: the layer and K, cross-fitted over every photo (issue 28)", "",
         "<!-- generated: experiments/study/layers_report.py -o docs/layers; plan: docs/study_plan.md, "
         "\"Study plan 2\" and its amendments (committed before any result) -->", "",
         f"All {res['photos']:,} shared photos (2,000 train + 1,000 validation), pooled; every photo scored once "
         "per seed on its original, by a model that saw no copy of it (5 outer folds over photos; seed = fold "
         "assignment; the probe's C by inner 3-fold cross-validation on the outer-training photos, its grid grown "
         "by amendments 1-2). Accuracy: mean over seeds and photos. Differences: paired by seed and photo, "
         "95% interval by a two-level bootstrap (seeds, then photos; 10,000 resamples). "
         f"CPU: {', '.join(res['cpu'])}.", ""]
    a = res["stage_a"]
    L += ["## Endpoint 1: which representation (stage A, K = 0)", "",
          "| representation | all photos | validation photos | seeds | per seed | cross-fit s/seed |", "|---|---|---|---|---|---|"]
    for rep in sorted(a, key=lambda r: -a[r]["all"]):
        v = a[rep]
        L.append(f"| {'**' + rep + '**' if rep == res['stage_a_best'] else rep} | {100 * v['all']:.1f}% | "
                 f"{100 * v['validation']:.1f}% | {v['seeds']} | "
                 f"{', '.join(f'{100 * x:.1f}' for x in v['per_seed'])} | {v['seconds_per_seed']:.0f} |")
    if "best_vs_map" in res:
        L += ["", f"**{res['stage_a_best']} − the book's cut ({MAP} flattened): "
              f"{diff_text(res['best_vs_map'])} points** (p = {res['best_vs_map']['p']:.4f})."]
    L += ["", "## Endpoint 2: how many copies (stage B)", "",
          "Accuracy against K; differences against K = 0 and against K = 10 (TOST within ±1 point: "
          "the 90% interval inside the margin).", ""]
    for rep, row in res["stage_b"].items():
        L += [f"### {rep}", "", "| K | all photos | validation | seeds | K − 0 | K − 10 [90% interval] | ≡ K = 10 |",
              "|---|---|---|---|---|---|---|"]
        for k, v in row["by_k"].items():
            d0 = diff_text(row["vs_0"][k]) if k in row["vs_0"] else ""
            d10 = row["vs_10"].get(k)
            t10 = f"{pts(d10['diff'])} [{pts(d10['ci90'][0])}, {pts(d10['ci90'][1])}]" if d10 else ""
            eq = ("yes" if d10["equivalent"] else "no") if d10 else ""
            L.append(f"| {k} | {100 * v['all']:.1f}% | {100 * v['validation']:.1f}% | {v['seeds']} | {d0} | {t10} | {eq} |")
        if "smallest_k_equivalent_to_10" in row:
            L += ["", f"Smallest K equivalent to K = 10 within ±1 point: **{row['smallest_k_equivalent_to_10']}**."]
        L.append("")
    c = res.get("stage_c") or {}
    if c:
        L += [f"## Endpoint 3: methods 1 and 2 against the probe, at {c['representation']}", "",
              "| arm | all photos | validation | seeds | best epochs (per outer fold) |", "|---|---|---|---|---|"]
        for n, v in c["arms"].items():
            ep = v.get("best_epochs")
            L.append(f"| {n} | {100 * v['all']:.1f}% | {100 * v['validation']:.1f}% | {v['seeds']} | "
                     f"{'median ' + str(int(np.median(ep))) + ', max ' + str(max(ep)) if ep else ''} |")
        L += ["", "| difference | points [95%] | p |", "|---|---|---|"]
        for n, d in c["pairs"].items():
            L.append(f"| {n} | {diff_text(d)} | {d['p']:.4f} |")
        L += ["", "Method 2 replays copies 1..10: past epoch 10, copies recycle (epoch e sees copy (e mod 10) + 1). "
              "Its accuracy at early stopping is an estimate of its converged accuracy, not a bound.", ""]
    L += ["## Endpoint 4: cost to reach 75%, 80% and 85%", "",
          f"Rows through the base: {N_ORIGINALS:,} originals + {N_ORIGINALS:,} per copy. Extraction at the store's "
          f"recorded cost ({res['extraction_seconds_per_row'] or float('nan'):.3f} s/row, {res['extraction_cpu']}, "
          "all taps in one pass, niced beside other work); training as the arm's measured cross-fit time per seed "
          "(5 outer folds, each with its inner C search: an upper bound on one fit).", "",
          "| target | cheapest arm | accuracy | rows | extraction min | cross-fit min/seed |", "|---|---|---|---|---|---|"]
    for t, c4 in res["cost"].items():
        L.append(f"| {t} | {c4['arm']} | {100 * c4['accuracy']:.1f}% | {c4['rows']:,} | "
                 f"{c4['extract_min']:.0f} | {c4['crossfit_min_per_seed']:.1f} |" if c4 else f"| {t} | not reached | | | | |")
    if res["fit"]:
        L += ["", "## Endpoint 5: `fit`'s printed accuracy against its own choices", "",
              "`fit`'s procedure at its defaults (K grown under 23,000 rows, then the nested estimate it prints), "
              "seeded 0-4. 'Own choice, cross-fitted': the stage A/B arm of the representation and K it finally "
              "chose, same seed (non-nested: the choice itself was made on these photos).", "",
              "| seed | printed (nested) | 95% CI | final choice | steps | own choice, cross-fitted | minutes |",
              "|---|---|---|---|---|---|---|"]
        for f in res["fit"]:
            own = f.get("own_choice_crossfitted")
            L.append(f"| {f['seed']} | {100 * f['printed']:.1f}% | {100 * f['ci95'][0]:.1f}–{100 * f['ci95'][1]:.1f} | "
                     f"{f['final']} | {f['steps']} | {f'{100 * own:.1f}%' if own is not None else 'not run'} | "
                     f"{f['minutes']:.1f} |")
    L += ["", "## Decision rules for `fit`'s defaults (fixed in the plan)", ""]
    r = res["rules"]
    if "1_representation" in r:
        x = r["1_representation"]
        L.append(f"1. Representation: `fit` chose {x['fit_modal']['taps']} at K = {x['fit_modal']['K']} in "
                 f"{x['fit_modal']['times']} of 5 seeds. "
                 + ("Beaten by more than 1 point (interval excluding 0) by: " + ", ".join(
                     f"{b['representation']} (K = {b['K']}, {diff_text(b)})" for b in x["beaten_by"]) + ": **fires**."
                    if x["fires"] else "No representation beats it by more than 1 point with an interval excluding 0: "
                                       "**does not fire**; the grid stays."))
    else:
        L.append("1. Representation: not evaluated (stage F or an arm it needs is incomplete).")
    if "2_budget" in r:
        d = r["2_budget"]["K10_minus_fit_K"]
        L.append(f"2. Budget: K = 10 − fit's K = {diff_text(d)}: "
                 + ("**fires**: the budget's default is revisited." if r["2_budget"]["fires"] else
                    "**does not fire**: the budget stays at 23,000 rows."))
    else:
        L.append("2. Budget: not evaluated (fit's representation has no stage-B arms, or they are incomplete).")
    if "3_dense_head" in r:
        d = r["3_dense_head"]["method2_minus_probe"]
        L.append(f"3. Dense head: method 2 − {r['3_dense_head']['probe']} = {diff_text(d)}: "
                 + ("**fires**: the dense head joins fit's default candidates." if r["3_dense_head"]["fires"] else
                    "**does not fire**: the probe stays fit's default."))
    else:
        L.append("3. Dense head: not evaluated (stage C incomplete).")
    return "\n".join(L) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", "--output", required=True, help="the folder with runs.jsonl(.gz) and photos.json")
    p.add_argument("--store", help="the study's store (its run log gives the extraction cost per row)")
    p.add_argument("--docs", default="docs", help="where results_layers.md and layers/endpoints.json go")
    p.add_argument("--per-row", type=float, help="extraction seconds per row, when the store is not at hand")
    a = p.parse_args()
    docs = Path(a.docs)
    res = report(Path(a.output), a.store, docs)
    if a.per_row:
        res["extraction_seconds_per_row"] = a.per_row
        for c in res["cost"].values():
            if c:
                c["extract_min"] = c["rows"] * a.per_row / 60
    (docs / "layers").mkdir(parents=True, exist_ok=True)
    (docs / "layers" / "endpoints.json").write_text(json.dumps(res, indent=1, default=float))
    (docs / "results_layers.md").write_text(markdown(res))
    print(f"wrote {docs / 'results_layers.md'} and {docs / 'layers' / 'endpoints.json'}")


if __name__ == "__main__":
    main()
