"""fit's report: report.json (every figure), report.md (what a user reads) and report.png (out-of-fold
accuracy against K), all from fit's result."""

from __future__ import annotations

import json
from pathlib import Path


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _ci(correct_rate: float, n: int) -> tuple[float, float]:
    from convcache.stats import accuracy_interval

    return accuracy_interval(round(correct_rate * n), n)


def representation_table(result: dict, n: int) -> list[dict]:
    """Stage 1 (K = 0): each representation at its best C, with a Wilson interval over the n photos."""
    best = {}
    for name, acc in result.get("out_of_fold", {}).items():
        rep, rest = name.split(" C=", 1)
        c, k = rest.split(" K=")
        if int(k) == 0 and (rep not in best or acc > best[rep]["accuracy"]):
            best[rep] = {"representation": rep, "C": float(c), "accuracy": acc, "ci95": list(_ci(acc, n))}
    return sorted(best.values(), key=lambda r: -r["accuracy"])


def write_fit_report(out: Path, cfg, result: dict) -> None:
    n = result["held_out"]["n"]
    reps = representation_table(result, n)
    for h in result["history"]:
        h["ci95"] = list(_ci(h["accuracy"], n))
    report = {"config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items()},
              "representations_at_k0": reps, **result}
    (out / "report.json").write_text(json.dumps(report, indent=1, sort_keys=True, default=str) + "\n")
    _plot(out / "report.png", reps, result["history"])
    (out / "report.md").write_text(_markdown(cfg, result, reps))


def _markdown(cfg, result: dict, reps: list[dict]) -> str:
    h, c = result["held_out"], result["choice"]
    lo, hi = h["ci95"]
    lines = [
        "# convcache fit: report", "",
        f"**Held-out accuracy {_pct(h['accuracy'])}** (n={h['n']} photos, 95% CI {_pct(lo)}-{_pct(hi)}): every "
        f"photo scored by a model chosen and fit without it ({cfg.outer_folds} outer folds; the choice made again "
        f"inside each by {cfg.inner_folds}-fold cross-validation). It estimates this whole procedure, choices "
        "included.", "",
        f"**Choice:** {' + '.join(c['taps'])}, linear probe (standardised logistic regression) C={c['C']:g}, "
        f"copies 0..{c['copies']} of every photo (copies extracted: 0..{result['copies_extracted']}).",
        f"**Cost:** {result['rows_through_base']:,} rows through the base (budget {cfg.budget_rows:,}), "
        f"{result['minutes']:.1f} minutes in all on this machine.", ""]
    if result.get("runner_up"):
        d, se = result["paired_difference"], result["paired_se"]
        lines += [f"**Runner-up:** {result['runner_up']}; the choice leads it by {100 * d:+.1f} ± {100 * se:.1f} "
                  "points (paired over photos, inner out-of-fold accuracy at K = 0, SE).", ""]
    if result.get("test"):
        t = result["test"]
        lines += [f"**Your test/ photos** (never used before this line): {_pct(t['accuracy'])} (n={t['n']}, 95% CI "
                  f"{_pct(t['ci95'][0])}-{_pct(t['ci95'][1])}).", ""]
    lines += ["## Copies (K), at the chosen representation", "",
              "| copies 0..K | rows | out-of-fold accuracy | 95% CI | gain over the previous step |",
              "|---|---|---|---|---|"]
    for e in result["history"]:
        gain = f"{100 * e['gain']:+.1f} ± {100 * e['gain_se']:.1f}" if "gain" in e else ""
        lines.append(f"| {e['copies']} | {e['rows']:,} | {_pct(e['accuracy'])} | {_pct(e['ci95'][0])}-"
                     f"{_pct(e['ci95'][1])} | {gain} |")
    lines += ["", "Copies are extracted only while the last step's gain is above its standard error and the next "
              "step fits the budget; the K kept is the smallest within one standard error of the best.", "",
              "## Representations (K = 0, each at its best C)", "",
              "| representation | C | out-of-fold accuracy | 95% CI |", "|---|---|---|---|"]
    lines += [f"| {r['representation']} | {r['C']:g} | {_pct(r['accuracy'])} | {_pct(r['ci95'][0])}-"
              f"{_pct(r['ci95'][1])} |" for r in reps]
    lines += ["", "Out-of-fold figures in these two tables chose the model, so they flatter it a little; the held-out "
              "accuracy above does not.", "", f"Chosen in each outer fold: {', '.join(h['chosen_per_fold'])}.", "",
              "![out-of-fold accuracy against K](report.png)", ""]
    return "\n".join(lines)


def _plot(path: Path, reps: list[dict], history: list[dict]) -> None:
    """Left: every representation at K = 0 (out-of-fold accuracy, 95% CI); right: the chosen one against K."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2), gridspec_kw={"width_ratios": [1.3, 1]})
    names = [r["representation"] for r in reps][::-1]
    acc = [100 * r["accuracy"] for r in reps][::-1]
    err = [[100 * (r["accuracy"] - r["ci95"][0]) for r in reps][::-1],
           [100 * (r["ci95"][1] - r["accuracy"]) for r in reps][::-1]]
    left.errorbar(acc, range(len(names)), xerr=err, fmt="o", capsize=2)
    left.set_yticks(range(len(names)), names, fontsize=7)
    left.set_xlabel("out-of-fold accuracy at K = 0, % (95% CI)")
    left.grid(alpha=0.3)
    ks = [e["copies"] for e in history]
    hacc = [100 * e["accuracy"] for e in history]
    herr = [[100 * (e["accuracy"] - e["ci95"][0]) for e in history],
            [100 * (e["ci95"][1] - e["accuracy"]) for e in history]]
    right.errorbar(ks, hacc, yerr=herr, marker="o", capsize=3)
    right.set_xticks(ks)
    right.set_xlabel("copies 0..K")
    right.set_ylabel("out-of-fold accuracy, % (95% CI)")
    right.set_title(history[0]["representation"], fontsize=8)
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
