"""The study at convergence (issue 18; plan: docs/study_plan.md, committed before any of its results).

Every run is one dense head (convcache.train.heads.DenseHead) on a feature store, replay schedule (epoch e
sees copy (e mod K) + 1 of every photo; K = 0: the originals), seeded, early-stopped on the select half of
validation, with the report half logged per epoch for learning curves only. Each run is saved as one JSON
file named by its settings, so every phase is resumable and a re-run reads finished runs back.

    converge.py phase1   --store caffe=A.zarr --store rescale=B.zarr --k 0 10 [--k-largest 30] -o OUT
    converge.py phase2   --store caffe=A.zarr ... -o OUT        (settings from OUT/phase1.json)
    converge.py analyse  -o OUT                                  (OUT/analysis.json: endpoints, checks)

Nothing here selects on the report half: phase 1 chooses (preprocessing, standardisation, learning rate)
by the lowest select-half loss at the selected epoch; phase 2 keeps the select-half-loss epoch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np

from convcache.runtime import cpu_model

# the plan's grids (docs/study_plan.md)
LR_GRID = [2e-6, 2e-5, 2e-4, 2e-3]  # decades, then the half-decades either side of the best; extended past an edge
MAX_EPOCHS, PATIENCE, BATCH = 150, 15, 20
PHASE2_K = [0, 1, 2, 5, 10, 30]  # + N (method 2)
PHASE2_SEEDS = [0, 1, 2, 3, 4]
MARGIN = 0.015  # the equivalence margin: 1.5 points of accuracy


def _key(run: dict) -> str:
    return hashlib.sha256(json.dumps(run, sort_keys=True).encode()).hexdigest()[:16]


class Stores:
    """Training data per preprocessing, loaded once with the copies a phase needs (restricted per run)."""

    def __init__(self, specs: list[str], max_copy: int):
        from convcache.train.data import load_training_data

        self.data, self._cut = {}, {}
        for spec in specs:
            name, path = spec.split("=", 1)
            t = time.perf_counter()
            self.data[name] = load_training_data(path, max_copy)
            print(f"loaded {name}: {path}, copies 0..{self.data[name].copies_used}, "
                  f"{len(self.data[name].train.y)} rows in {time.perf_counter() - t:.0f}s", flush=True)

    def get(self, preprocess: str, k: int):
        d = self.data[preprocess]
        if k > d.copies_used:
            raise SystemExit(f"{preprocess}: the store holds copies 0..{d.copies_used}, K={k} asked")
        if k == d.copies_used:
            return d
        if (preprocess, k) not in self._cut:
            self._cut = {(preprocess, k): d.with_copies(k)}  # one restriction held at a time
        return self._cut[(preprocess, k)]


def run_one(out: Path, stores: Stores, run: dict, quiet: bool = True) -> dict:
    """Train (or read back) one run: {phase, preprocess, standardize, lr, k, seed, epochs, patience}."""
    from convcache.train.heads import DenseHead
    from convcache.train.metrics import evaluate

    path = out / "runs" / f"{_key(run)}.json"
    if path.is_file():
        return json.loads(path.read_text())
    data = stores.get(run["preprocess"], run["k"])
    tr, sel, rep = data.train, data.select, data.report
    head = DenseHead(epochs=run["epochs"], batch_size=BATCH, learning_rate=run["lr"], patience=run["patience"],
                     schedule="replay", seed=run["seed"], standardize=run["standardize"], progress=not quiet)
    t = time.perf_counter()
    head.fit(tr.X, tr.y, sel.X, sel.y, image=tr.image, copy=tr.copy, X_curve=rep.X, y_curve=rep.y)
    wall = time.perf_counter() - t
    p_rep, p_sel = head.predict_proba(rep.X), head.predict_proba(sel.X)
    s = head.summary()
    res = {"run": run, "key": _key(run), "best_epoch": s["best_epoch"], "epochs_run": s["epochs_run"],
           "steps": s["steps"], "copies_used": s["copies_used"], "best_select_loss": s["best_select_loss"],
           "select": evaluate(p_sel, sel.y, 2), "report": evaluate(p_rep, rep.y, 2),
           "report_correct": (p_rep.argmax(1) == rep.y).astype(int).tolist(),
           "select_correct": (p_sel.argmax(1) == sel.y).astype(int).tolist(),
           "report_sha256": rep.sha256, "fit_seconds": head.fit_seconds_, "wall_seconds": wall,
           "history": [{k: h[k] for k in ("epoch", "train_loss_mean", "train_accuracy_mean", "select_loss",
                                           "select_accuracy", "report_loss", "report_accuracy", "train_seconds",
                                           "eval_seconds")} for h in s["history"]],
           "extractor": data.extractor_sha256, "cpu": cpu_model(),
           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(res) + "\n")
    tmp.replace(path)
    return res


def _say(res: dict) -> None:
    r = res["run"]
    print(f"{r['phase']} {r['preprocess']:7s} std={int(r['standardize'])} lr={r['lr']:.1e} K={r['k']:3d} "
          f"seed={r['seed']} epochs={r.get('epochs')}: best epoch {res['best_epoch']}/{res['epochs_run']}, select "
          f"loss {res['best_select_loss']:.4f} acc {res['select']['accuracy']:.3f} ({res['wall_seconds']:.0f}s)",
          flush=True)


def phase1(args) -> None:
    out = Path(args.output)
    stores = Stores(args.store, max(args.k + ([args.k_largest] if args.k_largest else [])))
    cells = {}
    ks = list(args.k) + ([args.k_largest] if args.k_largest else [])
    for k in ks:
        preps = list(stores.data) if k != args.k_largest else [args.largest_preprocess]
        epochs = MAX_EPOCHS if k != args.k_largest else min(MAX_EPOCHS, k)  # the largest K: method 2, no recycling
        for prep in preps:
            for std in (False, True):
                done = {}

                def at(lr, done=done, cell=(prep, std, k, epochs)):
                    lr = float(f"{lr:.2g}")
                    if lr not in done:
                        prep_, std_, k_, epochs_ = cell
                        run = {"phase": "phase1", "preprocess": prep_, "standardize": std_, "lr": lr, "k": k_,
                               "seed": 0, "epochs": epochs_, "patience": PATIENCE}
                        done[lr] = run_one(out, stores, run, args.quiet)
                        _say(done[lr])
                    return done[lr]["best_select_loss"]

                best = lr_search(at)
                cells[f"{prep}|{int(std)}|{k}"] = {
                    "preprocess": prep, "standardize": std, "k": k, "best_lr": best,
                    "best_select_loss": done[best]["best_select_loss"],
                    "select_accuracy": done[best]["select"]["accuracy"],
                    "by_lr": {str(lr): {"select_loss": done[lr]["best_select_loss"],
                                        "select_accuracy": done[lr]["select"]["accuracy"],
                                        "best_epoch": done[lr]["best_epoch"], "epochs_run": done[lr]["epochs_run"]}
                              for lr in sorted(done)}}
    settings = {}
    for k in ks:
        mine = [c for c in cells.values() if c["k"] == k]
        best = min(mine, key=lambda c: c["best_select_loss"])
        settings[str(k)] = {key: best[key] for key in ("preprocess", "standardize", "best_lr", "best_select_loss",
                                                       "select_accuracy")}
    prev = json.loads((out / "phase1.json").read_text()) if (out / "phase1.json").is_file() else {}
    prev.setdefault("cells", {}).update(cells)
    prev.setdefault("settings", {}).update(settings)
    prev["cpu"] = cpu_model()
    (out / "phase1.json").write_text(json.dumps(prev, indent=1, sort_keys=True) + "\n")
    for k, s in settings.items():
        print(f"phase 1, K={k}: {s['preprocess']}, standardize={s['standardize']}, lr {s['best_lr']:.1e} "
              f"(select loss {s['best_select_loss']:.4f}, accuracy {s['select_accuracy']:.3f})")


def lr_search(loss_at) -> float:
    """The plan's learning-rate search (amendment 2): convcache.protocol.search_learning_rate."""
    from convcache.protocol import search_learning_rate

    return search_learning_rate(loss_at)


def setting_for(k: int, settings: dict) -> dict:
    """Each phase-2 K takes the setting of the phase-1 K nearest to it on a log(K + 1) scale (ties: the
    smaller K), as the plan fixes."""
    ks = sorted(int(x) for x in settings)
    near = min(ks, key=lambda p: (abs(math.log(k + 1) - math.log(p + 1)), p))
    return {**settings[str(near)], "from_k": near}


def phase2(args) -> None:
    """The arms, in the order the answer needs them (method 1, method 2, then the K between), or `--ks`;
    `--matched`: method 1 trained for as many epochs as the longest phase-2 run so far, no early stopping.
    Several processes may run disjoint seeds or arms at once: every run is its own file."""
    out = Path(args.output)
    settings = json.loads((out / "phase1.json").read_text())["settings"]
    order = args.ks or list(dict.fromkeys([0, args.n, 10, 2, 5, 1, 30]))
    stores = Stores(args.store, max(order) if not args.matched else 0)
    if args.matched:
        done = [r for r in _phase2_runs(out, args.n) if r["run"]["phase"] == "phase2"]
        longest = max(r["epochs_run"] for r in done)
        s = setting_for(0, settings)
        for seed in args.seeds:  # method 1 trained for as many epochs (= steps) as the longest arm, no early stop
            run = {"phase": "phase2-matched", "preprocess": s["preprocess"], "standardize": s["standardize"],
                   "lr": s["best_lr"], "k": 0, "seed": seed, "epochs": longest, "patience": None}
            _say(run_one(out, stores, run, args.quiet))
    else:
        for k in order:
            s = setting_for(k, settings)
            epochs = min(MAX_EPOCHS, k) if k == args.n else MAX_EPOCHS  # method 2: a fresh copy every epoch
            for seed in args.seeds:
                run = {"phase": "phase2", "preprocess": s["preprocess"], "standardize": s["standardize"],
                       "lr": s["best_lr"], "k": k, "seed": seed, "epochs": epochs, "patience": PATIENCE}
                _say(run_one(out, stores, run, args.quiet))
    collect_phase2(out, args.n)


def _phase2_runs(out: Path, n: int) -> list[dict]:
    runs = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    return [r for r in runs if r["run"]["phase"] in ("phase2", "phase2-matched")
            and (r["run"]["phase"] == "phase2-matched" or r["run"]["k"] <= n)]


def collect_phase2(out: Path, n: int) -> dict:
    """OUT/phase2.json: every finished phase-2 run, by arm (the phase-1 setting each K takes now)."""
    settings = json.loads((out / "phase1.json").read_text())["settings"]
    arms = {}
    for r in _phase2_runs(out, n):
        q = r["run"]
        s = setting_for(q["k"], settings)
        if (q["preprocess"], q["standardize"], q["lr"]) != (s["preprocess"], s["standardize"], s["best_lr"]):
            continue  # a run at a setting phase 1 no longer picks
        if q["phase"] == "phase2" and q["epochs"] != (min(MAX_EPOCHS, n) if q["k"] == n else MAX_EPOCHS):
            continue  # method 2 runs N epochs (a fresh copy each); every other K recycles up to MAX_EPOCHS
        name = "method 1, steps matched" if q["phase"] == "phase2-matched" else str(q["k"])
        arms.setdefault(name, {})
        prev = arms[name].get(q["seed"])
        if prev is None or q["epochs"] > prev[1]:  # matched: the run with the most epochs per seed
            arms[name][q["seed"]] = (r["key"], q["epochs"])
    arms = {name: [key for _, (key, _) in sorted(by_seed.items())] for name, by_seed in arms.items()}
    res = {"n": n, "arms": arms, "settings": settings}
    (out / "phase2.json").write_text(json.dumps(res, indent=1, sort_keys=True) + "\n")
    return res


def probe(args) -> None:
    """The comparator: the standardised linear probe (C on the select half) on pooled copies 0..K."""
    from convcache.train.heads import LogRegHead
    from convcache.train.metrics import evaluate

    out = Path(args.output)
    stores = Stores([args.store], max(args.k))
    prep = next(iter(stores.data))
    for k in args.k:
        path = out / "probe" / f"{prep}-k{k}.json"
        if path.is_file():
            continue
        data = stores.get(prep, k)
        head = LogRegHead().fit(data.train.X, data.train.y, data.select.X, data.select.y)
        p_rep, p_sel = head.predict_proba(data.report.X), head.predict_proba(data.select.X)
        res = {"preprocess": prep, "k": k, "C": head.C_, "accuracy_by_C": {str(c): v for c, v in head.scores_.items()},
               "select": evaluate(p_sel, data.select.y, 2), "report": evaluate(p_rep, data.report.y, 2),
               "report_correct": (p_rep.argmax(1) == data.report.y).astype(int).tolist(),
               "select_correct": (p_sel.argmax(1) == data.select.y).astype(int).tolist(),
               "report_sha256": data.report.sha256, "fit_seconds": head.fit_seconds_, "cpu": cpu_model()}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res) + "\n")
        print(f"probe {prep} K={k}: C={head.C_}, select {res['select']['accuracy']:.3f}", flush=True)


def real(args) -> None:
    """One real TensorFlow method-2 run (end to end, frozen base, on-the-fly augmentation) at method 2's phase-1
    setting and seed, against the replay's same epochs from the cache (waits for that phase-2 run)."""
    from convcache.augment import PRESETS
    from convcache.train.reference import ReferenceConfig, run_reference

    out = Path(args.output)
    s = json.loads((out / "phase1.json").read_text())["settings"][str(args.n)]
    r = {"phase": "phase2", "preprocess": s["preprocess"], "standardize": s["standardize"], "lr": s["best_lr"],
         "k": args.n, "seed": args.seed, "epochs": min(MAX_EPOCHS, args.n), "patience": PATIENCE}
    folder = out / "real" / f"seed{args.seed}-e{args.epochs}"
    if not (folder / "metrics.json").is_file():
        run_reference(ReferenceConfig(data=args.data, weights="hed", output=str(folder), epochs=args.epochs,
                                      input_size=150, batch_size=BATCH, seed=args.seed, policy=PRESETS["book"],
                                      learning_rate=r["lr"], progress=not args.quiet, augment_seed=0,
                                      preprocess=r["preprocess"], standardize=r["standardize"]))
    m = json.loads((folder / "metrics.json").read_text())
    path = out / "runs" / f"{_key(r)}.json"
    while not path.is_file():  # the replay of the same run, trained by `phase2`
        time.sleep(10)
    replay = json.loads(path.read_text())
    res = {"setting": r, "epochs": args.epochs, "cpu": cpu_model()}
    for key in ("train_loss_mean", "select_loss", "select_accuracy", "report_accuracy"):
        tf_v = np.array([h[key] for h in m["history"]])
        rp_v = np.array([h[key] for h in replay["history"][: len(tf_v)]])
        res[key] = {"tensorflow": tf_v.tolist(), "replay": rp_v.tolist(),
                    "max_abs_diff": float(np.max(np.abs(tf_v - rp_v))),
                    "max_rel_diff": float(np.max(np.abs(tf_v - rp_v) / np.maximum(np.abs(tf_v), 1e-12)))}
    res["epoch_seconds"] = [h["train_seconds"] + h["eval_seconds"] for h in m["history"]]
    res["train_seconds"] = [h["train_seconds"] for h in m["history"]]
    (out / "real.json").write_text(json.dumps(res, indent=1) + "\n")
    print(f"real TensorFlow method 2 vs replay, {args.epochs} epochs: train loss max rel diff "
          f"{res['train_loss_mean']['max_rel_diff']:.1e}, select loss {res['select_loss']['max_rel_diff']:.1e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("phase1")
    a.add_argument("--store", action="append", required=True, metavar="PREPROCESS=STORE")
    a.add_argument("--k", type=int, nargs="*", default=[0, 10])
    a.add_argument("--k-largest", type=int, help="the largest K (method 2: epochs capped at K, no recycling)")
    a.add_argument("--largest-preprocess", default="caffe")
    a.add_argument("-q", "--quiet", action="store_true")
    a.add_argument("-o", "--output", required=True)
    a.set_defaults(func=phase1)
    b = sub.add_parser("phase2")
    b.add_argument("--store", action="append", required=True, metavar="PREPROCESS=STORE")
    b.add_argument("--n", type=int, required=True, help="N: the copies method 2 needs (its arm: replay of 1..N)")
    b.add_argument("--seeds", type=int, nargs="+", default=PHASE2_SEEDS)
    b.add_argument("--ks", type=int, nargs="+", help="only these K (default: 0, N, 10, 2, 5, 1, 30 in that order)")
    b.add_argument("--matched", action="store_true", help="method 1 with the longest phase-2 run's epochs")
    b.add_argument("-q", "--quiet", action="store_true")
    b.add_argument("-o", "--output", required=True)
    b.set_defaults(func=phase2)
    c = sub.add_parser("probe")
    c.add_argument("--store", required=True, metavar="PREPROCESS=STORE")
    c.add_argument("--k", type=int, nargs="+", default=[0, 10])
    c.add_argument("-o", "--output", required=True)
    c.set_defaults(func=probe)
    d = sub.add_parser("real")
    d.add_argument("--data", required=True)
    d.add_argument("--epochs", type=int, default=5)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--n", type=int, default=30)
    d.add_argument("-q", "--quiet", action="store_true")
    d.add_argument("-o", "--output", required=True)
    d.set_defaults(func=real)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
