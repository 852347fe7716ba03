"""Tables and plots of the study at convergence, from converge_report.py's JSON (docs/results_converge.json).

    converge_doc.py docs/results_converge.json --img docs/img > tables.md

Prints Markdown tables (pasted under the prose of docs/results.md) and writes the plots.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def pts(x: float) -> str:
    return f"{100 * x:+.1f}"


def ci(c) -> str:
    return f"[{pts(c[0])}, {pts(c[1])}]"


def tables(r: dict) -> str:
    out = []
    out.append("### Phase 1: settings (select half, seed 0)\n")
    out.append("| K | preprocessing | standardised | lr tried: select-half loss (best epoch / epochs run) | best lr |")
    out.append("|---|---|---|---|---|")
    for c in sorted(r["phase1_cells"].values(), key=lambda c: (c["k"], c["preprocess"], c["standardize"])):
        tried = "; ".join(f"{float(lr):.1e}: {v['select_loss']:.4f} ({v['best_epoch']}/{v['epochs_run']})"
                          for lr, v in sorted(c["by_lr"].items(), key=lambda kv: float(kv[0])))
        out.append(f"| {c['k']} | {c['preprocess']} | {'yes' if c['standardize'] else 'no'} | {tried} | "
                   f"{c['best_lr']:.1e} |")
    out.append("")
    out.append("Chosen per K (lowest select-half loss): " + "; ".join(
        f"K={k}: {s['preprocess']}, {'standardised' if s['standardize'] else 'raw'}, lr {s['best_lr']:.1e}"
        for k, s in sorted(r["phase1"].items(), key=lambda kv: int(kv[0]))) + ".\n")

    out.append("### Phase 2: every arm at its phase-1 setting, to its early stop (report half, 5 seeds; method 2: at "
               "most N epochs, a fresh copy each)\n")
    out.append("| arm | setting (preprocessing, std, lr) | report-half accuracy %, mean ± sd | best epoch per seed "
               "(epochs run) | − method 2, points [95% CI] | 90% CI | equivalent (TOST ±1.5) | non-inferior |")
    out.append("|---|---|---|---|---|---|---|---|")
    for key, a in sorted(r["arms"].items(), key=lambda kv: (not kv[0].isdigit(), int(kv[0]) if kv[0].isdigit()
                                                             else 0)):
        s = a["setting"]
        setting = f"{s['preprocess']}, {'std' if s['standardize'] else 'raw'}, {s['lr']:.1e}"
        eps = ", ".join(f"{b} ({e})" for b, e in zip(a["best_epochs"], a["epochs_run"]))
        t = r["vs_method2"].get(key)
        if t:
            cols = f"{pts(t['diff'])} {ci(t['ci95'])} | {ci(t['ci90'])} | {'yes' if t['equivalent'] else 'no'} | " \
                   f"{'yes' if t['noninferior'] else 'no'}"
        else:
            cols = "– | – | – | –"
        out.append(f"| {a['name']} | {setting} | {pct(a['report_mean'])} ± {100 * a['report_sd']:.1f} | {eps} | "
                   f"{cols} |")
    out.append("")
    if r.get("probe"):
        out.append("Linear probe (comparator; standardised logistic regression, C on the select half, pooled copies "
                   "0..K, one deterministic run): " + "; ".join(
                       f"{k}: {pct(p['report'])}% (C={p['C']}, select half {pct(p['select'])}%), vs method 2 "
                       f"{pts(p['vs_method2_seeds_photos']['diff'])} {ci(p['vs_method2_seeds_photos']['ci95'])} "
                       f"(seeds then photos; {ci(p['vs_method2_seed_mean']['ci95'])} against its seed mean)"
                       for k, p in sorted(r["probe"].items())) + ".\n")

    out.append("### Cost to reach 70, 75 and 80% (seed-mean report-half accuracy after each epoch)\n")
    out.append("| arm | 70% | 75% | 80% |")
    out.append("|---|---|---|---|")

    def cell(v):
        if v is None:
            return "not reached"
        s = f"{v['compute_s'] / 60:.1f} min (epoch {v['epoch']})"
        if "validation" in v:
            s += f" + {v['validation'] / 60:.1f} min validation"
        return s

    for key, reach in sorted(r["cost_to_reach"].items(), key=lambda kv: (not kv[0].isdigit(),
                                                                           int(kv[0]) if kv[0].isdigit() else 0)):
        name = r["arms"][key]["name"] if key in r["arms"] else key
        out.append(f"| {name} | " + " | ".join(cell(reach[str(t)]) for t in (0.7, 0.75, 0.8)) + " |")
    out.append("")
    rv = r["replay_vs_end_to_end"]
    out.append(f"### Method 2 replayed from the cache vs end to end ({rv['epochs_mean']:.1f} epochs on average, "
               f"{rv['copies_extracted']} copies extracted once)\n")
    out.append("| experiments | cached: extraction once + heads, min | end to end (training), min | ratio | "
               "with end-to-end validation, ratio |")
    out.append("|---|---|---|---|---|")
    for x, v in sorted(rv["by_experiments"].items(), key=lambda kv: int(kv[0])):
        out.append(f"| {x} | {v['cached_s'] / 60:.1f} | {v['end_to_end_train_s'] / 60:.1f} | "
                   f"{v['ratio_train_only']:.1f}x | {v['ratio_with_validation']:.1f}x |")
    out.append("")
    sw = r["swap"]
    out.append("### Check: the halves swapped (epoch chosen on the report half, accuracy on the select half)\n")
    out.append("| arm | select-half accuracy at the report-chosen epoch, mean over seeds |")
    out.append("|---|---|")
    for key in sorted((k for k in sw if k.isdigit()), key=int):
        out.append(f"| {r['arms'][key]['name']} | {pct(sw[key]['mean'])} |")
    d = sw["method2_minus_method1"]
    out.append(f"\nMethod 2 − method 1 with the halves swapped: {pts(d['mean'])} points (per seed: "
               + ", ".join(pts(x) for x in d["per_seed"]) + ").")
    out.append("Phase-1 settings chosen on the report half instead: " + "; ".join(
        f"K={k}: {s['preprocess']}, {'std' if s['standardize'] else 'raw'}, lr {s['lr']:.1e}"
        for k, s in sorted(sw["phase1_settings_chosen_on_report_half"].items(), key=lambda kv: int(kv[0]))) + ".\n")
    real = r.get("real_method2")
    if real:
        out.append(f"### Check: a real TensorFlow method-2 run against its replay ({real['epochs']} epochs, seed "
                   f"{real['setting']['seed']}, {real['setting']['preprocess']}, "
                   f"{'standardised' if real['setting']['standardize'] else 'raw'}, lr {real['setting']['lr']:.1e})\n")
        out.append("| epoch | train loss (epoch mean), TensorFlow | replay | select-half loss, TensorFlow | replay |")
        out.append("|---|---|---|---|---|")
        for e, (a, b, c, d) in enumerate(zip(real["train_loss_mean"]["tensorflow"], real["train_loss_mean"]["replay"],
                                             real["select_loss"]["tensorflow"], real["select_loss"]["replay"]), 1):
            out.append(f"| {e} | {a:.6f} | {b:.6f} | {c:.6f} | {d:.6f} |")
        out.append(f"\nLargest relative difference: training loss {real['train_loss_mean']['max_rel_diff']:.1e}, "
                   f"select-half loss {real['select_loss']['max_rel_diff']:.1e}. End-to-end epoch (train + "
                   f"validation through the base, under load): {sum(real['epoch_seconds']) / len(real['epoch_seconds']):.0f} s "
                   f"({real['cpu']}).\n")
    return "\n".join(out)


def plots(r: dict, img: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img.mkdir(parents=True, exist_ok=True)
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.8))
    for key, c in sorted(r["curves"].items(), key=lambda kv: (not kv[0].isdigit(), int(kv[0]) if kv[0].isdigit()
                                                              else 0)):
        name = r["arms"][key]["name"] if key in r["arms"] else key
        acc = [100 * x for x in c["report_accuracy"]]
        if key.isdigit():
            a.plot(range(1, len(acc) + 1), acc, label=name)
        b.plot([s / 60 for s in c["compute_s"]], acc, label=name, ls="--" if not key.isdigit() else "-")
    a.set_xlabel("epoch")
    a.set_ylabel("report-half accuracy %, mean over seeds")
    a.set_title("learning curves (curves only: nothing selected on them)")
    b.set_xscale("log")
    b.set_xlabel("total compute, minutes (extraction of the copies used + training), log")
    b.set_title("accuracy against compute")
    for t in (70, 75, 80):
        b.axhline(t, color="grey", lw=0.5)
    a.legend(fontsize=8)
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(img / "converge_curves.png", dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("results")
    p.add_argument("--img", default="docs/img")
    a = p.parse_args()
    r = json.loads(Path(a.results).read_text())
    print(answer(r) + "\n")
    print(tables(r))
    plots(r, Path(a.img))



def answer(r: dict) -> str:
    """The answer paragraph, worded from the endpoints (the prose around it is written by hand)."""
    n = r["n"]
    a1, a2 = r["arms"]["0"], r["arms"][str(n)]
    e1 = r["method2_minus_method1"]
    conv = r.get("method2_convergence") or {"converged": all(e < n for e in a2["epochs_run"]),
                                            "seeds_best_in_last_15": sum(e > n - 15 for e in a2["best_epochs"])}
    lead = (f"**At convergence, on these `hed` weights** (method 2 given N = {n} fresh copies, {conv['seeds_best_in_last_15']} "
            f"of 5 seeds keeping an epoch in the last 15; the plan's rule asks fewer than 3):" if conv["converged"] else
            f"**Every arm at its own best setting on these `hed` weights, method 2 capped at N = {n} fresh copies:**")
    s = [f"{lead} method 2 (end to end with augmentation, a fresh copy every "
         f"epoch, trained as its exact replay from the cache) reaches {pct(a2['report_mean'])}% ± "
         f"{100 * a2['report_sd']:.1f} on the report half (5 seeds), method 1 (the head on cached originals) "
         f"{pct(a1['report_mean'])}% ± {100 * a1['report_sd']:.1f}: method 2 − method 1 = {pts(e1['diff'])} points, "
         f"95% CI {ci(e1['ci95'])} (bootstrap over seeds, then photos)."]
    k = r["smallest_equivalent_k"]
    if k is not None:
        t = r["vs_method2"][str(k)]
        s.append(f"The fewest cached copies equivalent to method 2 within ±1.5 points (two one-sided tests) is "
                 f"**K = {k}** ({pct(r['arms'][str(k)]['report_mean'])}%; K − method 2 = {pts(t['diff'])}, 90% CI "
                 f"{ci(t['ci90'])}).")
    else:
        ni = r["smallest_noninferior_k"]
        s.append(f"No K below {n} is shown equivalent to method 2 within ±1.5 points by two one-sided tests"
                 + (f"; the smallest non-inferior one (K − method 2 > −1.5 points, one-sided 0.05) is **K = {ni}**"
                    f" ({pct(r['arms'][str(ni)]['report_mean'])}%, {pts(r['vs_method2'][str(ni)]['diff'])} "
                    f"{ci(r['vs_method2'][str(ni)]['ci90'])} at 90%)" if ni is not None else
                    ": every interval is wider than the margin or below it") + ".")
    c = r["recommended_vs_method2_end_to_end"]
    s.append(f"Counting the extraction of its copies once, the recommended arm (K = {r['recommended_k']}) costs "
             f"{c['recommended_compute_s'] / 60:.0f} min of this CPU against {c['method2_end_to_end_s'] / 60:.0f} min "
             f"for method 2 end to end: {c['ratio']:.1f}x less for one experiment and {c['ratio_4_experiments']:.1f}x "
             f"for four (per-unit costs measured back to back in one run, {r['costs'].get('cpu', '?')}).")
    pk = r.get("probe_becomes_default")
    if pk is not None:
        pr = r["probe"][f"K={pk}"]
        t = pr["vs_method2_seeds_photos"]
        s.append(f"The comparator beat every arm: the standardised linear probe on the originals and {pk} pooled "
                 f"copies reaches {pct(pr['report'])}% on the report half, {pts(t['diff'])} points over method 2, "
                 f"95% CI {ci(t['ci95'])} (method 2's seeds, then photos, resampled; {ci(pr['vs_method2_seed_mean']['ci95'])} "
                 f"against its seed mean). By the plan's rule it became `convcache fit`'s default head (until issue 28).")
    if not conv["converged"]:
        s.append(f"Caveat: method 2 was capped at N = {n} fresh copies, and {conv['seeds_best_in_last_15']} of "
                 f"{len(a2['epochs_run'])} seeds kept an epoch in the last 15 (best epochs "
                 f"{', '.join(map(str, a2['best_epochs']))}): its figure is method 2 at {n} epochs, an estimate of "
                 f"its converged accuracy (not a bound), until the store is extended (the study is resumable).")
    return " ".join(s)


if __name__ == "__main__":
    main()
