"""fit: photos in, a served model out, with the representation and K chosen on the user's own photos.

    OUT/extractor.onnx  (export: hed VGG16 with taps: block3..5_pool avg and max, the block5_pool map, one pass)
    OUT/features.zarr   (extract: originals and copies 0..K of every labelled photo, K grown only while it helps)
    OUT/head/           (the chosen linear probe, refit on every labelled photo)
    OUT/model.onnx      (fuse: pixels -> probabilities, the extractor cut down to the taps the head reads)
    OUT/report.md, report.json, report.png, fit.json

Every labelled photo is pooled (train/ and validation/, or one folder of classes; a test/ split is never
used to choose or fit: it is scored at the end when present). The choice is cross-fitted
(`convcache.train.crossfit`): folds of photos, copies with their photo. K grows 0 -> 2 -> 5 -> 10 -> ...
while the next step's out-of-fold gain exceeds its standard error and the rows through the base stay within
`budget_rows`. The printed held-out accuracy is the nested estimate: each photo scored by a model chosen and
fit without it. A killed run resumes (export and extract are resumable; the choice is recomputed).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from convcache.artifacts import DEFAULT_TAPS
from convcache.errors import ConvcacheError
from convcache.gpudecode import check_decoder, resolve_decoder
from convcache.protocol import FIT_DEFAULTS

POOLED_SPLITS = ("train", "validation")  # what fit learns from; test/ is only scored


@dataclass
class FitConfig:
    data: str
    output: str
    weights: str = FIT_DEFAULTS["weights"]
    input_size: int = FIT_DEFAULTS["input_size"]
    preprocess: str = FIT_DEFAULTS["preprocess"]
    policy: str = FIT_DEFAULTS["policy"]
    taps: tuple = DEFAULT_TAPS
    budget_rows: int = 23_000  # forward passes through the base at most (originals + copies of every photo)
    steps: tuple = (0, 2, 5, 10, 20, 30, 60)  # the K tried, in order, while each helps
    Cs: tuple = (0.01, 0.1, 1.0)
    outer_folds: int = 5
    inner_folds: int = 3
    seed: int = 0
    device: str = "auto"
    decoder: str = "auto"  # JPEG decoding for extract (gpudecode.resolve_decoder): auto is nvJPEG on CUDA
    progress: bool = True

    def __post_init__(self):
        if self.preprocess not in ("caffe", "rescale"):
            raise ConvcacheError(f"preprocess {self.preprocess!r}: choose caffe or rescale")
        if self.budget_rows < 1 or self.seed < 0:
            raise ConvcacheError("--budget-rows must be >= 1 and --seed >= 0")
        if not self.steps or self.steps[0] != 0 or list(self.steps) != sorted(set(self.steps)):
            raise ConvcacheError(f"steps {self.steps}: increasing copy counts starting at 0")
        if self.outer_folds < 2 or self.inner_folds < 2:
            raise ConvcacheError("--outer-folds and --inner-folds must be >= 2")
        if not self.Cs or min(self.Cs) <= 0:
            raise ConvcacheError("C values must be positive")
        check_decoder(self.decoder)
        if not Path(self.data).is_dir():
            raise ConvcacheError(f"{self.data}: fit needs a folder of photos: <class>/ folders, or train/<class>/ "
                                 "(and validation/<class>/, pooled with train)")


def _stage_key(cfg: FitConfig, *names: str) -> str:
    return hashlib.sha256(json.dumps({n: getattr(cfg, n) for n in names}, sort_keys=True,
                                     default=list).encode()).hexdigest()[:16]


class _State:
    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {}

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True, default=str) + "\n")
        tmp.replace(self.path)


def run_fit(cfg: FitConfig) -> dict:
    from convcache.train.crossfit import Search, default_representations, nested

    resolve_decoder(cfg.decoder, "cpu")  # torchvision's decoder without torchvision: refused before the export
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    state = _State(out / "fit.json")
    state.data["config"] = asdict(cfg)
    t0 = time.perf_counter()
    extractor = _export(cfg, out, state)
    store = out / "features.zarr"
    _extract(cfg, extractor, store, 0)  # the data as it is now: new photos extracted, moved ones relabelled
    listing = _listing(store)
    done = state.data.get("result")
    if done and state.data.get("fit_key") == _fit_key(cfg) and done.get("listing") == listing \
            and (out / "model.onnx").is_file():
        _say(cfg, f"fit: the photos and settings are those of the last fit: {out / 'model.onnx'} is current")
        return state.data
    if done:
        _say(cfg, "fit: the photos (or settings) changed since the last fit: fitting again")
    state.data.pop("result", None)
    state.data["fit_key"] = _fit_key(cfg)
    selection, steps, pool, history = _grow_copies(cfg, extractor, store, state)
    _say(cfg, f"fit: the held-out estimate ({cfg.outer_folds} outer folds over {pool.n_photos} photos)")
    t_est = time.perf_counter()
    search = Search(default_representations(list(pool.features)), cfg.Cs, tuple(steps), cfg.inner_folds, cfg.seed)
    estimate = nested(pool, search, cfg.outer_folds, progress=lambda i, n, c: _say(
                          cfg, f"fit: outer fold {i}/{n}: chose {c.name} ({time.perf_counter() - t_est:.0f} s)"))
    chosen = selection.chosen
    lo, hi = estimate.interval()
    result = {"held_out": {"accuracy": estimate.accuracy, "n": estimate.n, "ci95": [lo, hi],
                           "chosen_per_fold": [c.name for c in estimate.chosen]},
              "choice": {"taps": list(chosen.taps), "C": chosen.C, "copies": chosen.copies, "name": chosen.name},
              "copies_extracted": steps[-1], "history": history,
              "runner_up": selection.runner_up.name if selection.runner_up else None,
              "paired_difference": selection.paired_difference, "paired_se": selection.paired_se,
              "out_of_fold": {n: a for n, (a, _) in selection.scores.items()}}
    result["listing"] = listing
    head = _final_head(cfg, pool, selection, result, out, state)
    from convcache.train.fuse import fuse

    fuse(str(extractor), str(out / "head"), str(out / "model.onnx"))
    result.update(model=str(out / "model.onnx"), rows_through_base=_rows_through_base(store), listing=listing,
                  minutes=(time.perf_counter() - t0) / 60, estimate_minutes=estimate.seconds / 60)
    test = _score_test(store, chosen, head)
    if test:
        result["test"] = test
    state.data["result"] = result
    state.save()
    from convcache.pipeline.fit_report import write_fit_report

    write_fit_report(out, cfg, result)
    return state.data


def _say(cfg: FitConfig, line: str) -> None:
    if cfg.progress:
        print(line, flush=True)


def _export(cfg: FitConfig, out: Path, state: _State) -> Path:
    from convcache.artifacts import KIND_EXTRACTOR, read

    extractor = out / "extractor.onnx"
    key = _stage_key(cfg, "weights", "input_size", "preprocess", "taps")
    if extractor.is_file() and state.data.get("export_key") != key:
        raise ConvcacheError(f"{extractor} was made with other export settings; use a new output folder")
    if not extractor.is_file():
        from convcache.export.runner import export_extractor

        _say(cfg, f"fit: export ({cfg.weights} VGG16, {cfg.input_size}px, taps {', '.join(cfg.taps)})")
        export_extractor(cfg.weights, cfg.input_size, str(extractor), preprocess=cfg.preprocess, taps=cfg.taps)
    state.data["export_key"] = key
    state.data["extractor"] = read(extractor, KIND_EXTRACTOR).identity
    state.save()
    return extractor


def _extract(cfg: FitConfig, extractor: Path, store: Path, k: int) -> None:
    from convcache.extract.runner import ExtractConfig, run_extract

    _say(cfg, f"fit: extract originals and copies 1..{k} -> {store}" if k else f"fit: extract originals -> {store}")
    run_extract(ExtractConfig(model=str(extractor), data=cfg.data, output=str(store), augment=k,
                              augment_splits=POOLED_SPLITS, seed=0, policy=cfg.policy, device=cfg.device,
                              decoder=cfg.decoder, progress=cfg.progress))


def _pool(store: Path, k: int):
    from convcache.store import FeatureStore
    from convcache.train.crossfit import Pool

    fs = FeatureStore(store)
    splits = [s for s in fs.splits if s in POOLED_SPLITS]
    if not splits:
        raise ConvcacheError(f"{store}: no train or validation photos to learn from")
    return Pool.from_store(fs, splits=splits, max_copy=k)


def _grow_copies(cfg: FitConfig, extractor: Path, store: Path, state: _State):
    """Copies extracted step by step by `crossfit.grow`'s rule (`cfg.steps`, under `budget_rows`)."""
    from convcache.train.crossfit import Search, default_representations, grow

    def pool_at(k: int):
        _extract(cfg, extractor, store, k)
        return _pool(store, k)

    def say(entry: dict) -> None:
        _say(cfg, f"fit: copies 0..{entry['copies']}: out-of-fold accuracy {100 * entry['accuracy']:.1f}% on "
                  f"{entry['photos']} photos ({entry['representation']}, C={entry['C']:g})"
             + (f", gain {100 * entry['gain']:+.1f} ± {100 * entry['gain_se']:.1f} points" if "gain" in entry else ""))

    first = pool_at(0)
    search = Search(default_representations(list(first.features)), cfg.Cs, (0,), cfg.inner_folds, cfg.seed)
    sel, steps, pool, history = grow(pool_at, search, cfg.steps, cfg.budget_rows, first=first, progress=say)
    state.data["history"] = history
    state.save()
    return sel, steps, pool, history


def _final_head(cfg: FitConfig, pool, selection, result: dict, out: Path, state: _State) -> dict:
    """The chosen probe refit on copies 0..K of every photo, written as head/head.onnx with its taps, the choice
    and the cross-fitted estimate in its metadata."""
    from convcache import artifacts
    from convcache.artifacts.convert import check_parity
    from convcache.train.heads import LogRegHead

    chosen = selection.chosen
    rows = pool.rows(np.arange(pool.n_photos), chosen.copies)
    X = pool.matrix(chosen.taps, rows)
    head = LogRegHead(Cs=(chosen.C,), max_iter=1000).fit(X, pool.label[rows])
    ext = artifacts.read(out / "extractor.onnx", artifacts.KIND_EXTRACTOR)
    proto = head.to_onnx(opset=ext.opset)
    check_parity(proto, head.predict_proba(X[:64]), {artifacts.FEATURES: X[:64]}, artifacts.PROBABILITIES, 1e-4,
                 "the ONNX head")
    from convcache.store import FeatureStore

    classes = FeatureStore(out / "features.zarr").classes
    fit_record = {k: result[k] for k in ("held_out", "choice", "runner_up", "paired_difference", "paired_se",
                                         "copies_extracted", "listing")}
    artifacts.Head(head="logreg", classes=tuple(classes), n_features=X.shape[1], feature_shape=(X.shape[1],),
                   extractor_identity=ext.identity, taps=tuple(chosen.taps),
                   trained_on={"fit": fit_record, "photos": pool.n_photos, "rows": len(rows)}).write(proto)
    (out / "head").mkdir(exist_ok=True)
    artifacts.save_model(proto, out / "head" / "head.onnx")
    state.data["head"] = {"rows": int(len(rows)), "features": int(X.shape[1])}
    return {"estimator": head, "rows": int(len(rows)), "features": int(X.shape[1])}


def _score_test(store: Path, chosen, head: dict) -> dict | None:
    """The final model on the user's test/ photos (originals), when there are any: never used before here."""
    from convcache.stats import accuracy_interval
    from convcache.store import FeatureStore

    fs = FeatureStore(store)
    if "test" not in fs.splits:
        return None
    parts = [fs.load("test", max_copy=0, variable=t) for t in chosen.taps]
    X = np.concatenate([p.features.reshape(len(p), -1) for p in parts], axis=1)
    right = int((head["estimator"].predict(X) == parts[0].label).sum())
    lo, hi = accuracy_interval(right, len(X))
    return {"accuracy": right / len(X) if len(X) else float("nan"), "n": len(X), "ci95": [lo, hi]}


def _listing(store: Path) -> dict:
    """Each split's listing digest (`convcache.store.listing`): what the model is recorded as trained on."""
    from convcache.store import FeatureStore

    fs = FeatureStore(store)
    got = {split: fs.listing(split) for split in fs.splits}
    return {split: x.digest for split, x in got.items() if x is not None}


def _fit_key(cfg: FitConfig) -> str:
    """What a fit's result depends on besides the photos (a re-run with another of these fits again)."""
    return _stage_key(cfg, "weights", "input_size", "preprocess", "policy", "taps", "budget_rows", "steps", "Cs",
                      "outer_folds", "inner_folds", "seed")


def _rows_through_base(store: Path) -> int:
    from convcache.store import FeatureStore

    fs = FeatureStore(store)
    return int(sum(fs.rows(s) for s in fs.splits))
