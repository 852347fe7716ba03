"""Write docs/results_fixed_budget.md (superseded by the study at convergence, docs/results.md) (and docs/results.json, docs/img/*.png) from the study's compare runs.

    .venv/bin/python experiments/study/results_doc.py runs/study/block5-report runs/study/block4-report \\
        < experiments/study/reading.md

Every figure in the page comes from the results.json files given here; the page lists the commands.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from convcache.pipeline.report import ordered

DOCS = Path(__file__).resolve().parents[2] / "docs"
LABELS = {"block5_pool": "block5_pool (the book's setting)", "block4_pool": "block4_pool, average-pooled"}


def pct(v) -> str:
    return f"{100 * v:.1f}"


def layer_of(res: dict) -> str:
    return res["config"]["layer"] or "block5_pool"


def arm_line(name: str, arm: dict, res: dict) -> str:
    t = res["tests"].get(f"{name} vs method 2")
    vs = "–" if t is None else (f"{100 * t['diff']:+.1f} [{100 * t['ci95'][0]:+.1f}, {100 * t['ci95'][1]:+.1f}]"
                               f"{' noise' if t['inside_noise'] else ''}")
    comp = res["compute"][name]
    spread = f" ± {100 * arm['accuracy_sd']:.1f}" if arm["n_seeds"] > 1 else " (1 run, deterministic)"
    steps = arm["runs"][0]["steps"] or "–"
    return (f"| {name} | {pct(arm['accuracy_mean'])}{spread} | {steps} | {vs} | "
            f"{comp['extract_seconds']:.0f} | {comp['train_seconds']:.0f} |")


def section(res: dict, tag: str) -> list[str]:
    arms, real = res["arms"], res.get("real_reference")
    layer = layer_of(res)
    lines = [f"## {LABELS.get(layer, layer)}", ""]
    head = ("| arm | report-half accuracy %, mean ± sd over seeds | gradient steps | vs method 2, points "
            "[95% CI] | extraction s | training s |\n|---|---|---|---|---|---|")
    e, spe, bs = res["config"]["epochs"], res["steps_per_epoch"], res["config"]["batch_size"]
    for title, keep in ((f"Equal gradient steps ({e * spe:,} steps = {e} epochs x {spe} steps of {bs})",
                         lambda a: a["head"] == "dense" and a["match"] in ("steps", "both")),
                        (f"Equal epochs (pooled arms: {e} full passes over copies 0..K)",
                         lambda a: a["head"] == "dense" and a["match"] in ("epochs", "both")),
                        ("Linear probe (logistic regression; deterministic, one run per K)",
                         lambda a: a["head"] == "logreg")):
        lines += [f"### {title}", "", head]
        lines += [arm_line(n, a, res) for n, a in ordered(arms) if keep(a)] + [""]
    m21 = res["tests"].get("method 2 vs method 1")
    if m21:
        lines.append(f"Method 2 vs method 1 (paired bootstrap): {100 * m21['diff']:+.1f} points, 95% CI "
                     f"[{100 * m21['ci95'][0]:+.1f}, {100 * m21['ci95'][1]:+.1f}], p = {m21['p']:.3f}.")
        lines.append("")
    if real:
        lines += [f"**The replay on real data.** One real TensorFlow run of method 2 ({real['epochs']} epochs, seed "
                  f"{res['config']['seeds'][0]}) against the replay from the cache, same seed:", "",
                  "| epoch | TensorFlow end to end, train loss | replay from the cache, train loss | relative diff |",
                  "|---|---|---|---|"]
        for e, (a, b) in enumerate(zip(real["tf_train_loss"], real["replay_train_loss"]), 1):
            lines.append(f"| {e} | {a:.6f} | {b:.6f} | {abs(a - b) / abs(a):.1e} |")
        lines += ["", f"An end-to-end epoch (2,000 training images through the base + the 1,000 validation images) "
                      f"took {real['seconds_per_epoch']:.0f} s here; extraction took "
                      f"{1000 * res['extraction']['train']['seconds_per_row']:.1f} ms per cached row.", ""]
    lines += [f"![accuracy vs K, {layer}](img/{tag}_accuracy_vs_k.png)", "",
              f"![accuracy vs compute, {layer}](img/{tag}_accuracy_vs_compute.png)", ""]
    return lines


def answer(results: list[dict]) -> list[str]:
    """The three sentences at the top, computed from the runs."""
    m2 = []
    for res in results:
        arm, real = res["arms"]["method 2 (replay)"], res.get("real_reference")
        check = (f"; one real TensorFlow run of its first {real['epochs']} epoch(s) matches the replay's losses to "
                 f"{real['max_rel_diff']:.0e} relative" if real else "")
        m2.append(f"{pct(arm['accuracy_mean'])}% ± {100 * arm['accuracy_sd']:.1f} at {layer_of(res)} "
                  f"({res['config']['epochs']} epochs, {arm['n_seeds']} seeds{check})")
    first = ("**Method 2 replayed exactly from the cache** (frozen base, epoch e trains on cached copy e) reaches "
             + " and ".join(m2) + " on the report half of validation (mean ± sd over seeds).")
    ks, costs = [], []
    for res in results:
        a = res.get("answer", {}).get("equal steps")
        if not a:
            ks.append(f"no cached arm is within the noise at {layer_of(res)}")
            continue
        ks.append(f"K={a['k']} at {layer_of(res)} ({a['arm']}: {100 * a['diff']:+.1f} points vs method 2, 95% CI "
                  f"[{100 * a['ci95'][0]:+.1f}, {100 * a['ci95'][1]:+.1f}])")
        r = a.get("cheaper_by")
        if r:
            costs.append(f"{r['1']:.0f}x, {r['4']:.0f}x and {r['10']:.0f}x cheaper at {layer_of(res)}")
    second = ("The fewest cached copies that reach method 2's accuracy within the noise (paired bootstrap), at equal "
              "gradient steps: " + "; ".join(ks) + ".")
    third = ("Counting the extraction of those copies once plus each head's training, against method 2 paying the "
             "frozen base on every epoch, that is " + "; ".join(costs) + " for 1, 4 and 10 head experiments, "
             "with every time measured in the study, under load (the quiet-machine check below gives the ratios "
             "to quote: 21x, 44x and 58x at block5_pool)."
             if costs else "")
    return [first, "", second, "", third]


def main(folders: list[str]) -> None:
    results = [json.loads((Path(f) / "results.json").read_text()) for f in folders]
    (DOCS / "img").mkdir(parents=True, exist_ok=True)
    tags = []
    for f, res in zip(folders, results):
        tag = layer_of(res).split("_")[0] + ("_" + res["config"]["pooling"] if res["config"]["pooling"] else "")
        tags.append(tag)
        for png in ("accuracy_vs_k.png", "accuracy_vs_compute.png"):
            shutil.copy(Path(f) / png, DOCS / "img" / f"{tag}_{png}")
    slim = {tag: {k: v for k, v in r.items()} for tag, r in zip(tags, results)}
    (DOCS / "results.json").write_text(json.dumps(slim, indent=1, sort_keys=True) + "\n")
    page = ["# Results: is method 2 a cache replay, and how few cached copies are enough?", ""]
    page += ["<!-- generated by experiments/study/results_doc.py from the compare runs below; edit the script -->", ""]
    page += answer(results) + [""]
    page += sys.stdin.read().splitlines() if not sys.stdin.isatty() else []
    page += ["", "## Protocol", "",
             "- Data: `../shared/data/cats_and_dogs_small` (2,000 training photos, 1,000 validation photos), "
             "`--weights hed` (ImageNet VGG16 trained further for edges: compare methods with each other, not "
             "with the book's ImageNet numbers), 150x150, augmentation preset `book` (Keras 2.0.8 semantics).",
             "- Every dense arm: Chollet's head (Dense 256 relu, Dropout 0.5, sigmoid), RMSprop 2e-5, batch 20, "
             "30 epochs at block5_pool, 10 at block4_pool (the same for every arm of a layer); 3 seeds (0, 1, 2: initial weights, batch order, dropout masks). The kept epoch is the one "
             "with the lowest loss on the *select* half of validation (500 photos); every accuracy is on the other, "
             "*report* half (500 photos), which selected nothing. The linear probe picks C on the select half.",
             "- Method 1: the dense head on cached originals (K=0). Method 2: head + frozen base end to end with "
             "augmentation, trained as its exact replay from the cache (epoch e sees copy e; tests/test_replay.py "
             "checks the cache bookkeeping and parity against the project's own training loop; the equivalence holds by "
             "construction for a frozen base without batch-norm, and one real TensorFlow run checks it on these photos). Cached augmentation "
             "at K: the pooled schedule over copies 0..K, at equal gradient steps with method 2 and at equal epochs.",
             "- Differences: paired bootstrap over the 500 report-half photos of the seed-averaged correctness "
             "(10,000 resamples); 'noise' = the 95% interval contains 0. With 500 photos one point is 5 photos.",
             "- Compute: extraction of the copies an arm uses (measured by the store's own extract runs) + the "
             "arm's training time (mean over seeds); method 2 end to end = its epochs x the measured end-to-end epoch. "
             f"Machine: {results[0]['machine']['cpu']}, 2 cores, no GPU.", "",
             "Reproduce (about 3 hours on this 2-core CPU, resumable):", "", "```bash",
             "experiments/study/extract.sh      # exports the hed extractors; copies 0..30 (block5), 0..10 (block4)",
             "experiments/study/run.sh block5   # convcache compare ... (see the script)",
             "experiments/study/run.sh block4",
             ".venv/bin/python experiments/study/results_doc.py runs/study/block5-report runs/study/block4-report \\",
             "    < experiments/study/reading.md", "```", ""]
    for res, tag in zip(results, tags):
        page += section(res, tag)
    extra = DOCS / "results_freeze_boundary.md"  # issue 12's study (experiments/study/freeze_boundary.py doc)
    if extra.is_file():
        page += ["", extra.read_text()]
    (DOCS / "results_fixed_budget.md").write_text("\n".join(page) + "\n")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="compare runs' folders (each with results.json); the reading on stdin")
    main(parser.parse_args().runs)
