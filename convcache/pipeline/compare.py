"""compare: the study the project exists for, under one fair protocol (convcache.protocol).

Arms, named as the book names them (Chollet, DLwP sec. 5.3):
- method 1: the dense head on cached originals (K=0);
- method 2: head + frozen base end to end with augmentation. With a frozen base it is a replay of
  the cache (epoch e sees copy e+1), so it is trained here with the replay schedule on copies
  1..E; one real TensorFlow run of `real_epochs` epochs (same seed) checks the replay on real data;
- cached augmentation at K copies (pool schedule: copies 0..K shuffled together), reported at equal
  gradient steps with method 2 and at equal epochs (full passes over the K+1 copies);
- the linear probe: logistic regression at each K, beside them (not a method of the book).

Selection (epoch, C) happens on the select half of validation, figures are reported on the other
half; each dense arm runs with several seeds (initial weights, batch order, dropout), and differences
come with a paired bootstrap over report-half images. Results are resumable: an arm whose
metrics.json exists with the same settings is read back, not trained again.

This module orchestrates stages through their Python entry points; no stage imports it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from convcache.augment import AugmentPolicy
from convcache.errors import ConvcacheError
from convcache.gpudecode import check_decoder, resolve_decoder
from convcache.protocol import BOOK_BATCH_SIZE, BOOK_EPOCHS, BOOK_LEARNING_RATE, steps_per_epoch
from convcache.stats import mcnemar_exact, paired_bootstrap

log = logging.getLogger(__name__)


@dataclass
class CompareConfig:
    data: str
    output: str
    weights: str = "hed"
    input_size: int = 150
    layer: str | None = None
    pooling: str | None = None
    copies: list = field(default_factory=lambda: [0, 1, 2, 5, 10, 30])
    seeds: list = field(default_factory=lambda: [0, 1, 2])
    epochs: int = BOOK_EPOCHS  # the book's schedule (convcache.protocol)
    batch_size: int = BOOK_BATCH_SIZE
    learning_rate: float = BOOK_LEARNING_RATE
    policy: str = "book"
    real_epochs: int = 5  # one real TensorFlow end-to-end run (0: skip)
    logreg: bool = True
    equal_epochs: bool = True
    equal_epochs_max_k: int | None = None  # equal-epochs arms cost (K+1)x method 2's steps: cap K on a small CPU
    extractor: str | None = None  # reuse an exported extractor (its metadata sets weights, size, layer, ...)
    # the extractor's preprocessing (caffe, or rescale: the book's x/255); carried to the reference
    preprocess: str = "caffe"
    precision: str = "fp32"  # int8: every arm runs on features of an int8 extractor (calibrated on `calibration`)
    calibration: str | None = None
    store: str | None = None  # reuse (and extend) a feature store
    augment_seed: int = 0
    device: str = "auto"  # the extraction runtime, as for extract
    decoder: str = "auto"  # JPEG decoding for extract (gpudecode.resolve_decoder): auto is nvJPEG on CUDA
    progress: bool = True

    def __post_init__(self):
        if not self.copies or any(not isinstance(k, int) or k < 0 for k in self.copies):
            raise ConvcacheError("--copies: K values must be integers >= 0")
        if not self.seeds or any(not isinstance(s, int) or s < 0 for s in self.seeds):
            raise ConvcacheError("--seeds: seeds must be integers >= 0")
        if self.epochs < 1 or self.batch_size < 1 or self.real_epochs < 0 or not self.learning_rate > 0:
            raise ConvcacheError("--epochs and --batch-size must be >= 1, --real-epochs >= 0, --learning-rate > 0")
        if self.real_epochs > self.epochs:
            raise ConvcacheError("--real-epochs cannot exceed --epochs (it checks the first epochs of the replay)")
        if self.precision not in ("fp32", "int8"):
            raise ConvcacheError(f"--precision {self.precision!r}: compare runs on fp32 or int8 extractors")
        if self.precision == "int8" and not (self.calibration or self.extractor):
            raise ConvcacheError("--precision int8 needs --calibration DIR (images to calibrate the int8 extractor on)")
        if self.calibration and not Path(self.calibration).is_dir():
            raise ConvcacheError(f"--calibration {self.calibration}: not a directory")
        check_decoder(self.decoder)
        self.copies = sorted(set(self.copies))
        self.policy_obj = AugmentPolicy.parse(self.policy)

    @property
    def max_copy(self) -> int:
        return max(max(self.copies), self.epochs)


def report_only(output: str) -> dict:
    """Analyse and report the arms a (possibly unfinished) compare run has saved so far."""
    from convcache.pipeline.report import write_report

    path = Path(output) / "results.json"
    if not path.is_file():
        raise ConvcacheError(f"{path}: no results to report")
    results = json.loads(path.read_text())
    for arm in ("method 1", "method 2 (replay)"):
        if arm not in results["arms"]:
            raise ConvcacheError(f"{path}: '{arm}' has not finished yet; nothing to compare against")
    cfg = CompareConfig(**{k: v for k, v in results["config"].items()})
    _analyse(results, cfg)
    results["partial"] = results.get("partial", True)  # a finished run stays finished
    _save(Path(output), results)
    write_report(Path(output), results)
    return results


def run_compare(cfg: CompareConfig) -> dict:
    from convcache.train.data import load_training_data

    resolve_decoder(cfg.decoder, "cpu")  # torchvision's decoder without torchvision: refused before the export
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    extractor, export_seconds = _extractor(cfg, out)
    _adopt_extractor(cfg, extractor)
    store = Path(cfg.store) if cfg.store else out / ("features.zarr" if cfg.precision == "fp32"
                                                     else f"features-{cfg.precision}.zarr")  # never mixed
    _extract(cfg, extractor, store)
    cost = _extraction_cost(store)

    t = time.perf_counter()
    data = load_training_data(str(store), cfg.max_copy)
    load_seconds = time.perf_counter() - t
    n_images = int(data.train.image.max()) + 1
    steps = steps_per_epoch(n_images, cfg.batch_size)
    if data.copies_used < cfg.max_copy:
        raise ConvcacheError(f"{store}: holds copies 0..{data.copies_used}, the study needs 0..{cfg.max_copy}")
    arms = _plan(cfg, steps)
    results = {"config": {k: v for k, v in asdict(cfg).items()}, "machine": _machine(),
               "n_train_images": n_images, "steps_per_epoch": steps, "load_seconds": load_seconds,
               "export_seconds": export_seconds, "extraction": cost, "arms": {}}
    for arm in arms:  # cheapest and most needed first; every arm is saved as it finishes
        runs = []
        for seed in (cfg.seeds if arm["head"] == "dense" else [cfg.seeds[0]]):
            runs.append(_run_arm(cfg, out, arm, seed, data, str(store)))
        results["arms"][arm["name"]] = {**arm, "runs": [_slim(r) for r in runs], **_aggregate(runs)}
        if arm["name"] == "method 2 (replay)" and cfg.real_epochs:
            results["real_reference"] = _real_reference(cfg, out, results)
        _save(out, results)
    _analyse(results, cfg)
    results["partial"] = False
    _save(out, results)
    from convcache.pipeline.report import write_report

    write_report(out, results)
    return results


def _plan(cfg: CompareConfig, steps: int) -> list[dict]:
    dense = {"epochs": cfg.epochs, "batch_size": cfg.batch_size, "learning_rate": cfg.learning_rate}
    arms = [{"name": "method 1", "head": "dense", "k": 0, "schedule": "pool", "match": "both",
             "params": {**dense, "schedule": "pool"}},
            {"name": "method 2 (replay)", "head": "dense", "k": cfg.epochs, "schedule": "replay", "match": "both",
             "params": {**dense, "schedule": "replay"}}]
    for k in cfg.copies:
        if k:
            arms.append({"name": f"cached K={k}, equal steps", "head": "dense", "k": k, "schedule": "pool",
                         "match": "steps", "params": {**dense, "schedule": "pool", "steps_per_epoch": steps}})
    if cfg.logreg:
        for k in cfg.copies:
            arms.append({"name": f"linear probe K={k}", "head": "logreg", "k": k, "schedule": None, "match": None,
                         "params": {}})
    cap = cfg.max_copy if cfg.equal_epochs_max_k is None else cfg.equal_epochs_max_k
    for k in cfg.copies:
        if cfg.equal_epochs and 0 < k <= cap:
            arms.append({"name": f"cached K={k}, equal epochs", "head": "dense", "k": k, "schedule": "pool",
                         "match": "epochs", "params": {**dense, "schedule": "pool"}})
    return arms


def _run_arm(cfg, out, arm, seed, data, store) -> dict:
    from convcache.train.runner import train_head

    params = dict(arm["params"])
    if arm["head"] == "dense":
        params.update(seed=seed, progress=cfg.progress)
    key = hashlib.sha256(json.dumps([arm["head"], arm["k"], {k: v for k, v in params.items() if k != "progress"},
                                     data.extractor_sha256], sort_keys=True).encode()).hexdigest()[:16]
    name = arm["name"].replace(" ", "_").replace("(", "").replace(")", "").replace(",", "")
    folder = out / "arms" / name / f"seed{seed}"
    path = folder / "metrics.json"
    if path.is_file():
        m = json.loads(path.read_text())
        if m.get("arm_key") == key:
            log.info("%s seed %d: read back %s", arm["name"], seed, path)
            return m
    log.info("%s seed %d: training", arm["name"], seed)
    print(f"compare: {arm['name']}, seed {seed}", flush=True)
    m = train_head(store, arm["head"], str(folder), copies=arm["k"], params=params, data=data, export=False)
    m["arm_key"], m["seed"] = key, seed
    path.write_text(json.dumps(m, indent=1, sort_keys=True) + "\n")
    return m


def _slim(m: dict) -> dict:
    sel = m.get("selection", {})
    return {"seed": m.get("seed"), "report_accuracy": m["report"]["accuracy"],
            "report_log_loss": m["report"]["log_loss"],
            "select_accuracy": m["select"]["accuracy"], "fit_seconds": m["fit_seconds"], "steps": sel.get("steps"),
            "epochs_run": sel.get("epochs_run"), "best_epoch": sel.get("best_epoch"), "C": sel.get("C"),
            "copies_used": sel.get("copies_used"), "report_correct": m["report_correct"],
            "train_loss_mean": [h["train_loss_mean"] for h in sel.get("history", [])]}


def _aggregate(runs: list[dict]) -> dict:
    acc = np.array([r["report"]["accuracy"] for r in runs])
    correct = np.mean([r["report_correct"] for r in runs], axis=0)
    return {"accuracy_mean": float(acc.mean()), "accuracy_sd": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
            "accuracy_min": float(acc.min()), "accuracy_max": float(acc.max()), "n_seeds": len(runs),
            "fit_seconds_mean": float(np.mean([r["fit_seconds"] for r in runs])),
            "correct_mean": correct.tolist()}


def _extractor(cfg, out) -> tuple[Path, float]:
    if cfg.extractor:
        path = Path(cfg.extractor)
        if not path.is_file():
            raise ConvcacheError(f"--extractor {path}: not found")
        return path, 0.0
    from convcache.export.runner import export_extractor

    path = out / ("extractor.onnx" if cfg.precision == "fp32" else f"extractor-{cfg.precision}.onnx")
    t = time.perf_counter()
    if not path.is_file():
        export_extractor(cfg.weights, cfg.input_size, str(path), layer=cfg.layer, pooling=cfg.pooling,
                         precision=cfg.precision, calibration=cfg.calibration, preprocess=cfg.preprocess)
    return path, time.perf_counter() - t


def _adopt_extractor(cfg, path: Path) -> None:
    """The arms train on this extractor's features and the real TensorFlow run rebuilds its base: take
    weights, input size, cut, pooling and precision from the extractor's own metadata, never from
    defaults that may describe another model."""
    from convcache.artifacts import KIND_EXTRACTOR, read

    ext = read(path, KIND_EXTRACTOR)
    found = {"weights": ext.weights_source or cfg.weights, "input_size": ext.size,
             "layer": None if ext.layer == "block5_pool" and cfg.layer is None else ext.layer,  # None: the last
             "pooling": ext.pooling, "precision": ext.precision, "preprocess": ext.preprocess}
    for key, value in found.items():
        if getattr(cfg, key) != value:
            log.warning("compare: %s = %r from %s (not %r)", key, value, path, getattr(cfg, key))
            setattr(cfg, key, value)


def _extract(cfg, extractor: Path, store: Path) -> None:
    from convcache.extract.runner import ExtractConfig, run_extract

    s = run_extract(ExtractConfig(model=str(extractor), data=cfg.data, output=str(store), augment=cfg.max_copy,
                                  seed=cfg.augment_seed, policy=cfg.policy_obj, device=cfg.device,
                                  decoder=cfg.decoder, progress=cfg.progress))
    if s.skipped:
        log.warning("compare: %d files skipped by extract", len(s.skipped))


def _extraction_cost(store: Path) -> dict:
    """Seconds per row of extraction, measured by the store's own extract runs on this machine."""
    from convcache.store import FeatureStore

    fs = FeatureStore(store)
    out = {}
    for split in fs.splits:
        runs = fs.runs(split)
        rows, secs = sum(r["rows"] for r in runs), sum(r["seconds"] for r in runs)
        out[split] = {"rows_measured": rows, "seconds_measured": secs,
                      "seconds_per_row": secs / rows if rows else None,
                      "cpu": sorted({r.get("cpu", "?") for r in runs}), "rows_in_store": fs.rows(split)}
    if not out.get("train", {}).get("seconds_per_row"):
        raise ConvcacheError(f"{store}: no timed extract runs recorded; cannot account for extraction cost")
    return out


def _real_reference(cfg, out, results) -> dict:
    """One real TensorFlow end-to-end run (method 2, frozen base), checked against the replay's epochs."""
    from convcache.train.reference import ReferenceConfig, run_reference

    folder = out / "reference" / f"method2-seed{cfg.seeds[0]}-e{cfg.real_epochs}"
    path = folder / "metrics.json"
    if path.is_file():
        m = json.loads(path.read_text())
    else:
        print(f"compare: real TensorFlow method 2, {cfg.real_epochs} epochs, seed {cfg.seeds[0]}", flush=True)
        m = run_reference(ReferenceConfig(
            data=cfg.data, weights=cfg.weights, output=str(folder), epochs=cfg.real_epochs, augment=True,
            input_size=cfg.input_size, batch_size=cfg.batch_size, seed=cfg.seeds[0], policy=cfg.policy_obj,
            learning_rate=cfg.learning_rate, layer=cfg.layer, pooling=cfg.pooling, progress=cfg.progress,
            augment_seed=cfg.augment_seed, preprocess=cfg.preprocess))
    replay = next(r for r in results["arms"]["method 2 (replay)"]["runs"] if r["seed"] == cfg.seeds[0])
    tf_loss = np.array([h["train_loss_mean"] for h in m["history"]])
    rp_loss = np.array(replay["train_loss_mean"][: len(tf_loss)])
    epoch_seconds = [h["train_seconds"] + h["eval_seconds"] for h in m["history"]]
    return {"extractor_precision": cfg.precision, "epochs": len(tf_loss), "tf_train_loss": tf_loss.tolist(),
            "replay_train_loss": rp_loss.tolist(),
            "max_rel_diff": float(np.max(np.abs(rp_loss - tf_loss) / np.abs(tf_loss))),
            "seconds_per_epoch": float(np.mean(epoch_seconds)), "epoch_seconds": epoch_seconds,
            "train_seconds_per_epoch": float(np.mean([h["train_seconds"] for h in m["history"]])),
            "report_accuracy_after": m["report"]["accuracy"], "cpu": _machine()["cpu"]}


def _analyse(results: dict, cfg: CompareConfig) -> None:
    arms = results["arms"]
    m2 = arms["method 2 (replay)"]
    m1 = arms["method 1"]
    tests = {}
    for name, arm in arms.items():
        if name == "method 2 (replay)":
            continue
        tests[f"{name} vs method 2"] = paired_bootstrap(m2["correct_mean"], arm["correct_mean"])
        if name != "method 1":
            tests[f"{name} vs method 1"] = paired_bootstrap(m1["correct_mean"], arm["correct_mean"])
    tests["method 2 vs method 1"] = paired_bootstrap(m1["correct_mean"], m2["correct_mean"])
    s0 = cfg.seeds[0]
    per_seed = {}
    for name, arm in arms.items():
        run = next((r for r in arm["runs"] if r["seed"] == s0), None)
        ref = next(r for r in m2["runs"] if r["seed"] == s0)
        if run is not None and name != "method 2 (replay)":
            per_seed[f"{name} vs method 2 (seed {s0})"] = mcnemar_exact(ref["report_correct"], run["report_correct"])
    results["tests"] = tests
    results["mcnemar"] = per_seed

    # compute: extraction (once) + training, in seconds on this machine
    cost = results["extraction"]
    per_row = cost["train"]["seconds_per_row"]
    n = results["n_train_images"]
    val_rows = cost.get("validation", {}).get("rows_in_store", 0)
    val_cost = val_rows * (cost.get("validation", {}).get("seconds_per_row") or per_row)
    real = results.get("real_reference")
    method2_epoch = real["seconds_per_epoch"] if real else None
    compute = {}
    for name, arm in arms.items():
        copies = arm["k"] + 1 if arm["schedule"] != "replay" else arm["k"]  # replay never reads copy 0
        extract_s = copies * n * per_row + val_cost
        compute[name] = {"extract_seconds": extract_s, "train_seconds": arm["fit_seconds_mean"]}
    if method2_epoch:
        compute["method 2 (end to end)"] = {"extract_seconds": 0.0, "train_seconds": method2_epoch * cfg.epochs,
                                            "note": f"{cfg.epochs} x the measured end-to-end epoch "
                                                    "(train + validation)"}
    for c in compute.values():
        c["total"] = {str(e): c["extract_seconds"] + e * c["train_seconds"] for e in (1, 4, 10)}
    results["compute"] = compute

    # the answer: the smallest K within the noise of method 2 (or better), and its cost ratio
    answer = {}
    for match in ("steps", "epochs"):
        for k in sorted({a["k"] for a in arms.values() if a["match"] in (match, "both") and a["schedule"] == "pool"}):
            name = "method 1" if k == 0 else f"cached K={k}, equal {match}"
            if name not in tests and name + " vs method 2" not in tests:
                continue
            t = tests.get(f"{name} vs method 2")
            if t and (t["inside_noise"] or t["diff"] > 0):
                entry = {"arm": name, "k": k, "diff": t["diff"], "ci95": t["ci95"]}
                if method2_epoch:
                    entry["cheaper_by"] = {e: compute["method 2 (end to end)"]["total"][e] / compute[name]["total"][e]
                                           for e in ("1", "4", "10")}
                answer[f"equal {match}"] = entry
                break
    results["answer"] = answer


def _machine() -> dict:
    from convcache.runtime import cpu_model

    return {"cpu": cpu_model(), "python": platform.python_version(), "machine": platform.machine()}


def _save(out: Path, results: dict) -> None:
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1, sort_keys=True, default=_json_default) + "\n")
    tmp.replace(out / "results.json")


def _json_default(o):
    if isinstance(o, AugmentPolicy):
        return o.to_dict()
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    raise TypeError(type(o).__name__)
