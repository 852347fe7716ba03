"""report.md and two plots from a compare run's results.json."""

from __future__ import annotations

from pathlib import Path


def ordered(arms: dict) -> list:
    """Arms in reading order: method 1, method 2, then by K."""
    rank = {"method 1": 0, "method 2 (replay)": 1}
    return sorted(arms.items(), key=lambda kv: (rank.get(kv[0], 2), kv[1]["k"], kv[0]))


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def _arm_row(name, arm, results) -> str:
    runs = arm["runs"]
    steps = runs[0]["steps"]
    best = ", ".join(str(r["best_epoch"] if r["best_epoch"] is not None else f"C={r['C']:g}") for r in runs)
    comp = results["compute"][name]
    spread = f" ± {100 * arm['accuracy_sd']:.1f}" if arm["n_seeds"] > 1 else " (deterministic)"
    test = results["tests"].get(f"{name} vs method 2")
    vs = "–" if test is None else (f"{100 * test['diff']:+.1f} [{100 * test['ci95'][0]:+.1f}, "
                                   f"{100 * test['ci95'][1]:+.1f}]"
                                  f"{' (noise)' if test['inside_noise'] else ''}")
    return (f"| {name} | {arm['head']} | {arm['k']} | {arm['schedule'] or '–'} | {steps if steps else '–'} | "
            f"{_pct(arm['accuracy_mean'])}{spread} | {_pct(arm['accuracy_min'])}–{_pct(arm['accuracy_max'])} | "
            f"{vs} | {best} | {comp['extract_seconds']:.0f} | {comp['train_seconds']:.0f} |")


HEADER = ("| arm | head | K | schedule | steps | report acc % (mean ± sd) | range | vs method 2, points [95% CI] | "
          "selected epoch / C per seed | extract s | train s |\n|---|---|---|---|---|---|---|---|---|---|---|")


def write_report(out: Path, results: dict) -> None:
    cfg = results["config"]
    arms = results["arms"]
    _plots(out, results)
    lines = ["# convcache comparison", "",
             f"- data `{cfg['data']}`, weights `{cfg['weights']}`, {cfg['input_size']}x{cfg['input_size']}, features "
             f"{cfg['layer'] or 'block5_pool'}{', ' + cfg['pooling'] + '-pooled' if cfg['pooling'] else ''}; "
             f"augmentation preset `{cfg['policy']}`",
             f"- schedule: {cfg['epochs']} epochs of {results['steps_per_epoch']} steps, batch {cfg['batch_size']}, "
             f"RMSprop {cfg['learning_rate']:g}; seeds {cfg['seeds']}; {results['n_train_images']} training images",
             "- protocol: epoch (dense) and C (probe) selected by the lowest loss / best accuracy on the *select* "
             "half of validation; every accuracy below is on the other, *report* half "
             f"({len(next(iter(arms.values()))['correct_mean'])} images). 'vs method 2': paired bootstrap over "
             "report-half images of the seed-averaged correctness (10,000 resamples); '(noise)': the 95% interval "
             "contains 0.",
             f"- machine: {results['machine']['cpu']}; extraction "
             f"{1000 * results['extraction']['train']['seconds_per_row']:.1f} "
             "ms per row (measured by the store's own extract runs)", ""]
    for title, match in (("Equal gradient steps (every dense arm: the same steps as method 2)", "steps"),
                         ("Equal epochs (cached arms: full passes over copies 0..K)", "epochs")):
        lines += [f"## {title}", "", HEADER]
        for name, arm in ordered(arms):
            if arm["head"] == "dense" and arm["match"] in (match, "both"):
                lines.append(_arm_row(name, arm, results))
        lines.append("")
    probes = [(n, a) for n, a in ordered(arms) if a["head"] == "logreg"]
    if probes:
        lines += ["## Linear probe (logistic regression, C on the select half)", "", HEADER]
        lines += [_arm_row(n, a, results) for n, a in probes] + [""]
    real = results.get("real_reference")
    if real:
        lines += [f"## Method 2 in TensorFlow vs its replay from the cache (seed {cfg['seeds'][0]})", "",
                  "| epoch | TensorFlow train loss | replay train loss | relative diff |", "|---|---|---|---|"]
        for e, (a, b) in enumerate(zip(real["tf_train_loss"], real["replay_train_loss"]), 1):
            lines.append(f"| {e} | {a:.6f} | {b:.6f} | {abs(a - b) / abs(a):.2e} |")
        lines += ["", f"End-to-end epoch (train + validation): {real['seconds_per_epoch']:.0f} s on this machine.", ""]
        if real.get("extractor_precision", "fp32") != "fp32":
            lines += [f"The arms ran on a {real['extractor_precision']} extractor; TensorFlow runs the fp32 base, so "
                      "these differences measure the quantisation's effect on training, not the replay's exactness "
                      "(that is checked on fp32).", ""]
    ans = results.get("answer", {})
    if ans:
        lines += ["## The answer", ""]
        for match, a in ans.items():
            ratio = a.get("cheaper_by")
            lines.append(f"- {match}: smallest K within the noise of method 2 (or better): **{a['arm']}** "
                         f"({100 * a['diff']:+.1f} points, 95% CI [{100 * a['ci95'][0]:+.1f}, "
                         f"{100 * a['ci95'][1]:+.1f}])"
                         + (f"; cheaper than method 2 by {ratio['1']:.1f}x for 1 head experiment, {ratio['4']:.1f}x "
                            f"for 4, {ratio['10']:.1f}x for 10" if ratio else ""))
        lines.append("")
    lines += ["![accuracy vs K](accuracy_vs_k.png)", "", "![accuracy vs compute](accuracy_vs_compute.png)", ""]
    (out / "report.md").write_text("\n".join(lines))


def _plots(out: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = results["arms"]
    m2 = arms["method 2 (replay)"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, pick in (("cached dense, equal steps",
                         lambda n, a: a["head"] == "dense" and a["match"] in ("steps", "both")
                         and a["schedule"] == "pool"),
                        ("cached dense, equal epochs",
                         lambda n, a: a["head"] == "dense" and a["match"] in ("epochs", "both")
                         and a["schedule"] == "pool"),
                        ("linear probe", lambda n, a: a["head"] == "logreg")):
        pts = sorted((a["k"], 100 * a["accuracy_mean"], 100 * a["accuracy_sd"]) for n, a in arms.items() if pick(n, a))
        if pts:
            ax.errorbar([p[0] + 0.5 for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                        capsize=3, label=label)
    ax.axhspan(100 * (m2["accuracy_mean"] - m2["accuracy_sd"]), 100 * (m2["accuracy_mean"] + m2["accuracy_sd"]),
               color="firebrick", alpha=0.15)
    ax.axhline(100 * m2["accuracy_mean"], color="firebrick", linestyle="--", label="method 2 (replay), mean ± sd")
    ax.set_xscale("log")
    ks = sorted({a["k"] for a in arms.values() if a["schedule"] == "pool" or a["head"] == "logreg"})
    ax.set_xticks([k + 0.5 for k in ks])
    ax.set_xticklabels([str(k) for k in ks])
    _finish(plt, fig, ax, "cached augmented copies per image, K (log scale)", out / "accuracy_vs_k.png")

    comp = results["compute"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, arm in arms.items():
        if name == "method 2 (replay)":
            continue
        marker = "o" if arm["head"] == "logreg" else ("^" if arm["match"] == "epochs" else "s")
        x = comp[name]["extract_seconds"] + comp[name]["train_seconds"]
        ax.errorbar(x, 100 * arm["accuracy_mean"], yerr=100 * arm["accuracy_sd"], marker=marker, capsize=2,
                    linestyle="none")
        ax.annotate(name.replace("cached ", "").replace(", equal", ","), (x, 100 * arm["accuracy_mean"]), fontsize=6,
                    xytext=(3, 3), textcoords="offset points")
    if "method 2 (end to end)" in comp:
        x2 = comp["method 2 (end to end)"]["train_seconds"]
        ax.axvline(x2, color="firebrick", linestyle="--", label="method 2 end to end: compute")
        ax.errorbar(x2, 100 * m2["accuracy_mean"], yerr=100 * m2["accuracy_sd"], marker="D", color="firebrick",
                    capsize=2, linestyle="none", label="method 2 end to end (its replay's accuracy)")
    ax.axhline(100 * m2["accuracy_mean"], color="firebrick", linestyle=":", label="method 2: accuracy")
    ax.set_xscale("log")
    from matplotlib.ticker import NullFormatter

    ax.xaxis.set_minor_formatter(NullFormatter())
    _finish(plt, fig, ax, "total compute for one head experiment: extraction + training, s (log)",
            out / "accuracy_vs_compute.png")


def _finish(plt, fig, ax, xlabel: str, path: Path) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel("report-half validation accuracy, %")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
