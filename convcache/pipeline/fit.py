"""fit: the study's answer as a default. Photos in, a served model out, through every stage's artifact:

    OUT/extractor.onnx  (export: hed VGG16 at block5_pool, the recommended preprocessing)
    OUT/features.zarr   (extract: originals + K copies, the book's augmentation)
    OUT/head/           (train: the recommended head, chosen on the select half of validation: the
                         standardised linear probe on pooled copies 0..K (C), or with --head dense the
                         dense head on the replay schedule (epochs and early stopping))
    OUT/model.onnx      (fuse: pixels -> probabilities, for `predict` and `serve`)
    OUT/fit.json        (the settings, each stage's result, the held-out accuracy)

Every default comes from `convcache.protocol.FIT_DEFAULTS` (the answer in docs/results.md, chosen by the
decision rules of docs/study_plan.md). A killed run resumes: export and train are atomic, extract is
resumable, and a stage whose artifact exists with the same settings is not run again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from convcache.errors import ConvcacheError
from convcache.protocol import FIT_DEFAULTS


@dataclass
class FitConfig:
    data: str
    output: str
    weights: str = FIT_DEFAULTS["weights"]
    input_size: int = FIT_DEFAULTS["input_size"]
    preprocess: str = FIT_DEFAULTS["preprocess"]
    copies: int | None = None  # None: the head's (FIT_DEFAULTS["copies"])
    policy: str = FIT_DEFAULTS["policy"]
    head: str = FIT_DEFAULTS["head"]
    standardize: bool = FIT_DEFAULTS["standardize"]
    learning_rate: float | str = FIT_DEFAULTS["learning_rate"]  # or "auto": the protocol's search on the select half
    max_epochs: int = FIT_DEFAULTS["max_epochs"]
    patience: int = FIT_DEFAULTS["patience"]
    batch_size: int = FIT_DEFAULTS["batch_size"]
    seed: int = 0
    device: str = "auto"
    progress: bool = True

    def __post_init__(self):
        if self.preprocess not in ("caffe", "rescale"):
            raise ConvcacheError(f"preprocess {self.preprocess!r}: choose caffe or rescale")
        if self.head not in ("dense", "logreg"):
            raise ConvcacheError(f"head {self.head!r}: choose dense or logreg")
        if self.copies is None:
            self.copies = FIT_DEFAULTS["copies"][self.head]
        if self.copies < 0 or self.seed < 0:
            raise ConvcacheError("copies and seed must be >= 0")
        positive = isinstance(self.learning_rate, (int, float)) and self.learning_rate > 0
        if self.learning_rate != "auto" and not positive:
            raise ConvcacheError(f"learning_rate {self.learning_rate!r}: a positive number or 'auto'")
        if self.max_epochs < 1 or self.patience < 1 or self.batch_size < 1:
            raise ConvcacheError("max_epochs, patience and batch_size must be >= 1")
        if not Path(self.data).is_dir() or not (Path(self.data) / "train").is_dir() \
                or not (Path(self.data) / "validation").is_dir():
            raise ConvcacheError(f"{self.data}: fit needs photos in DATA/train/<class>/ and DATA/validation/<class>/ "
                                 "(validation selects the epoch on one half and reports the other)")


def _stage_key(cfg: FitConfig, *names: str) -> str:
    return hashlib.sha256(json.dumps({n: getattr(cfg, n) for n in names}, sort_keys=True).encode()).hexdigest()[:16]


def run_fit(cfg: FitConfig) -> dict:
    from convcache.artifacts import KIND_EXTRACTOR, read
    from convcache.stats import accuracy_interval

    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "fit.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    state["config"] = asdict(cfg)

    def save():
        tmp = state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1, sort_keys=True) + "\n")
        tmp.replace(state_path)

    # 1. export
    extractor = out / "extractor.onnx"
    key = _stage_key(cfg, "weights", "input_size", "preprocess")
    if extractor.is_file() and state.get("export_key") != key:
        raise ConvcacheError(f"{extractor} was made with other export settings; use a new output folder")
    if not extractor.is_file():
        from convcache.export.runner import export_extractor

        _say(cfg, f"fit: export ({cfg.weights} VGG16, {cfg.input_size}px, {cfg.preprocess} preprocessing)")
        export_extractor(cfg.weights, cfg.input_size, str(extractor), preprocess=cfg.preprocess)
    state["export_key"] = key
    state["extractor"] = read(extractor, KIND_EXTRACTOR).identity
    save()

    # 2. extract (resumable by itself: only missing rows are computed)
    from convcache.augment import AugmentPolicy
    from convcache.extract.runner import ExtractConfig, run_extract

    store = out / "features.zarr"
    _say(cfg, f"fit: extract originals + {cfg.copies} augmented copies -> {store}")
    summary = run_extract(ExtractConfig(model=str(extractor), data=cfg.data, output=str(store), augment=cfg.copies,
                                        seed=0, policy=AugmentPolicy.parse(cfg.policy), device=cfg.device,
                                        progress=cfg.progress))
    state["skipped"] = len(summary.skipped)
    save()

    # 3. train
    from convcache.train.runner import train_head

    head_dir = out / "head"
    key = _stage_key(cfg, "weights", "input_size", "preprocess", "copies", "policy", "head", "standardize",
                     "learning_rate", "max_epochs", "patience", "batch_size", "seed")
    metrics_path = head_dir / "metrics.json"
    if state.get("train_key") == key and metrics_path.is_file() and (head_dir / "head.onnx").is_file():
        metrics = json.loads(metrics_path.read_text())
    else:
        if cfg.head == "dense":
            params = {"epochs": cfg.max_epochs, "patience": cfg.patience, "learning_rate": cfg.learning_rate,
                      "batch_size": cfg.batch_size, "schedule": "replay", "standardize": cfg.standardize,
                      "seed": cfg.seed, "progress": cfg.progress}
        else:
            params = {}
        _say(cfg, f"fit: train the {cfg.head} head on copies 0..{cfg.copies}")
        metrics = train_head(str(store), cfg.head, str(head_dir), copies=cfg.copies, params=params)
        state["train_key"] = key
    save()

    # 4. fuse
    from convcache.train.fuse import fuse

    model = out / "model.onnx"
    fuse(str(extractor), str(head_dir), str(model))

    result = {}
    for half in ("select", "report"):
        if half in metrics:
            n = int(metrics[half]["rows"])
            acc = float(metrics[half]["accuracy"])
            lo, hi = accuracy_interval(round(acc * n), n)
            result[half] = {"accuracy": acc, "n": n, "ci95": [lo, hi]}
    state.update({"result": result, "model": str(model), "epochs_run": metrics.get("epochs"),
                  "best_epoch": metrics.get("selection", {}).get("best_epoch")})
    save()
    return state


def _say(cfg: FitConfig, line: str) -> None:
    if cfg.progress:
        print(line, flush=True)
