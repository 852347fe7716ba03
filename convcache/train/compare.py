"""compare: on one dataset and budget, method 1 (cached originals), cached augmentation at several K,
and the end-to-end reference with and without augmentation (and optionally fine-tuning).

The other stages are driven through their command line and artifacts (extractor.onnx,
features.zarr), as a user would. Extraction is incremental: K=0 first, then each larger K adds
only its new copies, so the extraction time of a K is the sum of its runs.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path

from convcache.cli import main as cli
from convcache.errors import ConvcacheError
from convcache.train.reference import run_reference
from convcache.train.runner import train_head

log = logging.getLogger(__name__)

BUDGETS = {
    # K values, reference epochs, dense-head epochs (early-stopped), fine-tune epochs, RMSprop learning rate
    # shared by the dense head and the reference. `full` is Chollet's recipe (30 epochs at 2e-5); `cpu`
    # fits a 2-core machine, with a 5x learning rate so that 3 end-to-end epochs get somewhere.
    "tiny": {"copies": [0, 1], "epochs": 1, "head_epochs": 3, "fine_tune_epochs": 1, "learning_rate": 1e-4},
    "cpu": {"copies": [0, 1, 2], "epochs": 3, "head_epochs": 30, "fine_tune_epochs": 1, "learning_rate": 1e-4},
    "full": {"copies": [0, 1, 2, 5, 10], "epochs": 30, "head_epochs": 30, "fine_tune_epochs": 10,
             "learning_rate": 2e-5},
}


def run_compare(data: str, weights: str, out_dir: str, budget: str = "cpu", input_size: int = 150,
                layer: str | None = None, pooling: str | None = None, copies: list[int] | None = None,
                epochs: int | None = None, fine_tune: bool = False, heads=("logreg", "dense"),
                references: bool = True, seed: int = 0) -> list[dict]:
    if budget not in BUDGETS:
        raise ConvcacheError(f"unknown budget {budget!r}; choose {', '.join(BUDGETS)}")
    plan = dict(BUDGETS[budget])
    plan["copies"] = sorted(set(copies)) if copies else plan["copies"]
    plan["epochs"] = epochs or plan["epochs"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    extractor, store = out / "extractor.onnx", out / "features.zarr"
    rows = []

    t = time.perf_counter()
    export_args = ["export", "--weights", weights, "--input-size", str(input_size), "-o", str(extractor)]
    export_args += (["--layer", layer] if layer else []) + (["--pooling", pooling] if pooling else [])
    _cli(export_args)
    export_seconds = time.perf_counter() - t

    extract_seconds = 0.0
    for k in plan["copies"]:
        t = time.perf_counter()
        _cli(["extract", "--model", str(extractor), "--data", data, "-o", str(store), "--augment", str(k),
              "--seed", str(seed), "--no-progress"], ok=(0, 3))
        extract_seconds += time.perf_counter() - t
        for head in heads:
            params = ({"epochs": plan["head_epochs"], "seed": seed, "learning_rate": plan["learning_rate"]}
                      if head == "dense" else {})
            m = train_head(str(store), head, str(out / "heads" / f"{head}-k{k}"), copies=k, params=params)
            rows.append(_row("cached" if k else "cached originals (method 1)", head, f"K={k}", m,
                             extract_seconds, m["fit_seconds"]))

    if references:
        settings = [("reference, no augmentation", False, None), ("reference, augmentation (method 2)", True, None)]
        if fine_tune:
            settings.append(("reference, augmentation + fine-tune block5", True, "block5"))
        for name, aug, ft in settings:
            tag = name.split(", ", 1)[1].replace(" ", "-").replace("(", "").replace(")", "")
            m = run_reference(data, weights, str(out / "reference" / tag), epochs=plan["epochs"], use_augment=aug,
                              input_size=input_size, seed=seed, fine_tune=ft,
                              fine_tune_epochs=plan["fine_tune_epochs"], learning_rate=plan["learning_rate"],
                              layer=layer, pooling=pooling)
            label = f"{plan['epochs']} epochs" + (f" + {plan['fine_tune_epochs']} fine-tune" if ft else "")
            rows.append(_row(name, "dense (end to end)", label, m, 0.0, m["fit_seconds"]))

    (out / "results.json").write_text(json.dumps({"plan": plan, "budget": budget, "export_seconds": export_seconds, "rows": rows}, indent=2) + "\n")
    write_report(out, rows, plan, budget, data, weights, input_size, layer, pooling, export_seconds)
    return rows


def _cli(args: list[str], ok=(0,)) -> None:
    code = cli(args)
    if code not in ok:
        raise ConvcacheError(f"`convcache {' '.join(args)}` failed with exit status {code}")


def _row(method, head, setting, m, extract_seconds, train_seconds) -> dict:
    return {
        "method": method, "head": head, "setting": setting, "copies": m.get("copies"),
        "val_accuracy": m.get("validation", {}).get("accuracy"), "test_accuracy": m.get("test", {}).get("accuracy"),
        "val_auc": m.get("validation", {}).get("roc_auc"),
        "extract_seconds": extract_seconds, "train_seconds": train_seconds,
        "total_seconds": extract_seconds + train_seconds, "seconds_per_epoch": m.get("seconds_per_epoch")
        or m.get("selection", {}).get("seconds_per_epoch"), "train_rows": m["rows"]["train"],
    }


def _fmt(v, pct=False):
    if v is None:
        return "–"
    return f"{100 * v:.1f}%" if pct else f"{v:.1f}"


def write_report(out: Path, rows, plan, budget, data, weights, input_size, layer, pooling, export_seconds) -> None:
    _plots(out, rows)
    lines = [
        "# convcache comparison", "",
        f"- data: `{data}`; weights: `{weights}`; input {input_size}x{input_size}; "
        f"features: {layer or 'block5_pool'}{', ' + pooling + '-pooled' if pooling else ''}",
        f"- budget `{budget}`: K in {plan['copies']}, reference {plan['epochs']} epochs, dense head up to "
        f"{plan['head_epochs']} epochs with early stopping; fine-tune {plan['fine_tune_epochs']} epochs when asked; "
        f"RMSprop learning rate {plan['learning_rate']:g} for the dense head and the reference",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "- extraction time counts every extract run up to that K (the cache is incremental); training time is the "
        "head's fit or the reference's whole run (its per-epoch validation included)",
        f"- the one-off export (TensorFlow start-up, conversion, parity check) took {export_seconds:.0f}s and is "
        "not in the table",
        "", "| method | head | K or epochs | val acc | test acc | val AUC | extract s | train s | total s | s/epoch |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['method']} | {r['head']} | {r['setting']} | {_fmt(r['val_accuracy'], True)} | "
                     f"{_fmt(r['test_accuracy'], True)} | {_fmt(r['val_auc'] and r['val_auc'], True)} | "
                     f"{_fmt(r['extract_seconds'])} | {_fmt(r['train_seconds'])} | {_fmt(r['total_seconds'])} | "
                     f"{_fmt(r['seconds_per_epoch'])} |")
    lines += ["", "![accuracy vs total time](accuracy_vs_time.png)", "", "![accuracy vs K](accuracy_vs_k.png)", ""]
    (out / "report.md").write_text("\n".join(lines))


def _plots(out: Path, rows) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if r["val_accuracy"] is None:
            continue
        marker = "s" if r["method"].startswith("reference") else ("o" if r["head"] == "logreg" else "^")
        ax.scatter(r["total_seconds"], 100 * r["val_accuracy"], marker=marker)
        ax.annotate(f"{r['head'].split()[0]} {r['setting']}" if not r["method"].startswith("reference")
                    else r["method"].replace("reference, ", "ref: "), (r["total_seconds"], 100 * r["val_accuracy"]),
                    fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("total wall time, s (log)")
    ax.set_ylabel("validation accuracy, %")
    ax.set_title("Accuracy against total wall time")
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_time.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for head in sorted({r["head"] for r in rows if not r["method"].startswith("reference")}):
        pts = sorted((r["copies"], 100 * r["val_accuracy"]) for r in rows
                     if r["head"] == head and not r["method"].startswith("reference") and r["val_accuracy"] is not None)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"cached, {head}")
    refs = [r for r in rows if r["method"].startswith("reference") and r["val_accuracy"] is not None]
    for r, color in zip(refs, ("dimgray", "black", "firebrick")):
        ax.axhline(100 * r["val_accuracy"], linestyle="--", linewidth=1, color=color,
                   label=f"{r['method']} ({r['setting']})")
    ax.set_xticks(sorted({r["copies"] for r in rows if isinstance(r["copies"], int)}))
    ax.set_xlabel("augmented copies per training image (K)")
    ax.set_ylabel("validation accuracy, %")
    ax.set_title("Accuracy against K")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_k.png", dpi=120)
    plt.close(fig)
