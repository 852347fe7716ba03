"""train: fit a head on cached features, export it to ONNX, verify it, and write metrics.json."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx

from convcache import artifacts
from convcache.artifacts.convert import check_parity
from convcache.errors import ConvcacheError
from convcache.store import FeatureStore
from convcache.train.data import TrainingData, load_training_data
from convcache.train.heads import HEADS
from convcache.train.metrics import evaluate, write_metrics

log = logging.getLogger(__name__)


@dataclass
class TrainPlan:
    """What `train_head` will do, resolved once from its arguments: the mode, the head's name in the
    metrics, the data (and the store, for the modes that read it block by block)."""

    mode: str  # top, stream, search, dense, linear
    head: str
    data: TrainingData
    fs: FeatureStore | None
    copies: int | None
    params: dict
    streaming: bool
    load_seconds: float


@dataclass
class TrainRequest:
    """What `train_head` is asked to fit, checked once when made (the CLI builds one too): the store, the head,
    copies 0..K (None: all), the head's parameters, a loaded `data` to reuse, storage options, the memory
    budget in bytes over which logreg streams, and `train_top` (fine-tune block5 on cached block4 maps)."""

    store: str
    head: str
    copies: int | None = None
    params: dict | None = None
    data: TrainingData | None = None
    storage_options: dict | None = None
    memory_budget: int | None = None
    train_top: str | None = None

    def __post_init__(self):
        if self.head not in HEADS:
            raise ConvcacheError(f"unknown head {self.head!r}; choose {', '.join(HEADS)}")
        if self.copies is not None and self.copies < 0:
            raise ConvcacheError(f"--copies {self.copies}: must be >= 0")
        if self.memory_budget is not None and self.memory_budget <= 0:
            raise ConvcacheError("--memory-budget must be positive")


def plan_training(req: TrainRequest) -> TrainPlan:
    store, head, copies, data, storage_options = req.store, req.head, req.copies, req.data, req.storage_options
    memory_budget, train_top = req.memory_budget, req.train_top
    params = dict(req.params or {})
    auto_lr = params.get("learning_rate") == "auto"
    start, fs, streaming = time.perf_counter(), None, head == "logreg-stream"
    if train_top:
        if head != "dense" or data is not None:
            raise ConvcacheError("--train-top trains the top under the dense head: use --head dense")
        fs = FeatureStore(store, storage_options)
        data = load_training_data(fs, copies, train_features=False)  # maps are read per epoch, chunk by chunk
    elif data is None:
        fs = FeatureStore(store, storage_options)
        need = 2 * fs.nbytes("train", copies)  # the features as float32, and their standardized copy
        if memory_budget is not None and need > memory_budget:
            streaming = True
            head = "dense" if head == "dense" else "logreg-stream"
            log.info("train needs ~%.1f GiB, over the budget: streaming %s", need / 2**30, head)
        data = load_training_data(fs, copies, train_features=not streaming)
    elif copies is not None:
        data = data.with_copies(min(copies, data.copies_used))
    if data.select is None and head in ("dense", "logreg-stream"):
        raise ConvcacheError(f"the {head} head selects its epoch on half of the validation split, and the store has "
                             "none")
    if auto_lr and (head != "dense" or train_top or streaming):
        raise ConvcacheError("--learning-rate auto searches the in-memory dense head's learning rate; not with "
                             "--train-top, streaming or other heads")
    if train_top:
        mode, head = "top", f"top-{train_top}"
    elif streaming and fs is not None:
        mode = "stream"
    elif auto_lr:
        mode = "search"
    else:
        mode = "dense" if head == "dense" else "linear"
    params = {**params, "train_top": train_top} if train_top else params
    return TrainPlan(mode, head, data, fs, copies, params, streaming, time.perf_counter() - start)


def _fit_top(plan: TrainPlan):
    tr, sel, fs = plan.data.train, plan.data.select, plan.fs
    params = {k: v for k, v in plan.params.items() if k != "train_top"}
    estimator = _top_head(fs, plan.params["train_top"], params)
    fs.check("train")  # the digests, block by block, before any epoch reads rows
    return estimator.fit(None, tr.y, sel.X, sel.y, image=tr.image, copy=tr.copy,
                         fetch=lambda rows: fs.take("train", tr.row[rows]))


def _fit_stream(plan: TrainPlan):
    tr, sel, fs = plan.data.train, plan.data.select, plan.fs
    estimator = HEADS[plan.head](**plan.params)
    if plan.head == "dense":  # logreg verifies every block in its first pass; the dense head has none
        fs.check("train")

    def blocks(epoch):  # epoch -1: logreg's scaler pass, in stored order, verifying every block's digest
        for b in fs.iter_blocks("train", max_copy=plan.copies, shuffle=epoch >= 0,
                                seed=estimator.seed * 100003 + epoch + 1, verify=epoch < 0):
            yield b.features.reshape(len(b), -1), b.labels

    estimator.fit_stream(blocks, np.unique(tr.y), sel.X, sel.y)
    return estimator


def _fit_dense(plan: TrainPlan):
    tr, sel = plan.data.train, plan.data.select
    return HEADS["dense"](**plan.params).fit(tr.X, tr.y, sel.X, sel.y, image=tr.image, copy=tr.copy)


def _fit_linear(plan: TrainPlan):
    tr, sel = plan.data.train, plan.data.select
    return HEADS[plan.head](**plan.params).fit(tr.X, tr.y, sel.X if sel else None, sel.y if sel else None)


FIT = {"top": _fit_top, "stream": _fit_stream, "search": lambda plan: _search_learning_rate(
    plan.params, plan.data.train, plan.data.select), "dense": _fit_dense, "linear": _fit_linear}


def train_head(store: str, head: str, out_dir: str, copies: int | None = None, params: dict | None = None, *,
               export: bool = True, **options) -> dict:
    """Fit `head` on originals + copies 1..K of the store's train split, select on the select half of
    validation, report on the report half (and on test when the store has one). `data` reuses a
    loaded store (restricted to `copies`); `export=False` writes metrics.json only, no head.onnx.
    When the train split's features would not fit `memory_budget` bytes, logreg streams them from the
    store block by block (StreamingLogRegHead) instead of loading them. `train_top="block5"` fine-tunes
    block5 + the dense head on a store of cached block4_pool maps (convcache.train.top). `options` are the
    rest of `TrainRequest`'s fields."""
    req = TrainRequest(store, head, copies, params, **options)
    plan = plan_training(req)
    estimator = FIT[plan.mode](plan)
    _check_classes(plan, estimator)
    metrics = _metrics(plan, estimator, req.memory_budget)
    if export:
        _export(plan, estimator, Path(out_dir), metrics)
    write_metrics(Path(out_dir) / "metrics.json", metrics)
    return metrics


def _check_classes(plan: TrainPlan, estimator) -> None:
    """The heads take any labels (scikit-learn's contract): a class with no training row would leave the head
    with fewer outputs than the store has classes. Refused, naming the class."""
    n = len(plan.data.classes)
    fitted = [int(c) for c in getattr(estimator, "classes_", range(n))]
    if fitted != list(range(n)):
        missing = [plan.data.classes[i] for i in range(n) if i not in fitted]
        raise ConvcacheError(f"the training rows hold no photo of {', '.join(map(repr, missing))}: every class "
                             "needs training photos")


def _metrics(plan: TrainPlan, estimator, memory_budget: int | None) -> dict:
    data, summary = plan.data, estimator.summary()
    metrics = {
        "method": "cached", "head": plan.head, "streaming": plan.streaming, "memory_budget": memory_budget,
        "copies": data.copies_used, "copies_requested": plan.copies,
        "copies_available": data.copies_available, "schedule": summary.get("schedule"),
        "epochs": summary.get("epochs_run"), "steps": summary.get("steps"),
        "classes": data.classes, "fit_seconds": estimator.fit_seconds_, "load_seconds": plan.load_seconds,
        "rows": {"train": int(len(data.train.y))}, "selection": summary,
        "provenance": data.provenance, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    for name, split in (("select", data.select), ("report", data.report), ("test", data.test)):
        if split is not None:
            proba = estimator.predict_proba(split.X)
            metrics[name] = evaluate(proba, split.y, len(data.classes))
            metrics["rows"][name] = int(len(split.y))
            if name == "report":
                metrics["report_correct"] = (proba.argmax(1) == split.y).astype(int).tolist()
                metrics["report_proba"] = proba.astype(float).tolist()
                metrics["report_sha256"] = split.sha256
    return metrics


def _export(plan: TrainPlan, estimator, out: Path, metrics: dict) -> None:
    """head.onnx: checked, at parity with the estimator, with the head's contract in its metadata."""
    data = plan.data
    proto = estimator.to_onnx(opset=data.extractor_opset)  # the extractor's opset: fusion joins one opset
    onnx.checker.check_model(proto, full_check=True)
    check = (data.report or data.select or data.train).X[:64]
    if plan.mode == "top":  # the top takes the boundary maps themselves
        check = check.reshape(len(check), *data.feature_shape)
    metrics["onnx_max_abs_diff"] = check_parity(proto, estimator.predict_proba(check), {artifacts.FEATURES: check},
                                                artifacts.PROBABILITIES, 1e-4, "the ONNX head")
    artifacts.Head(head=plan.head, classes=tuple(data.classes), n_features=int(np.prod(data.feature_shape)),
                   feature_shape=tuple(data.feature_shape), extractor_identity=data.extractor_sha256,
                   trained_on=data.provenance).write(proto)
    artifacts.save_model(proto, out / "head.onnx")  # never leaves a half-written head under the real name
    metrics["head_onnx"] = str(out / "head.onnx")


def _search_learning_rate(params: dict, tr, sel):
    """The dense head at the learning rate the protocol's search picks on the select-half loss
    (convcache.protocol.search_learning_rate); every rate tried is kept in the summary."""
    import time

    from convcache.protocol import search_learning_rate

    fits, start = {}, time.perf_counter()

    def loss_at(lr):
        est = HEADS["dense"](**{**params, "learning_rate": lr})
        est.fit(tr.X, tr.y, sel.X, sel.y, image=tr.image, copy=tr.copy)
        fits[lr] = est
        log.info("learning rate %.2g: select-half loss %.4f (epoch %d)", lr, est.best_select_loss_, est.best_epoch_)
        return est.best_select_loss_

    best = fits[search_learning_rate(loss_at)]
    best.learning_rate_search_ = {f"{lr:.2g}": {"select_loss": e.best_select_loss_, "best_epoch": e.best_epoch_,
                                                "epochs_run": e.epochs_run_} for lr, e in sorted(fits.items())}
    best.fit_seconds_ = time.perf_counter() - start  # the search is part of the cost
    return best


def _top_head(fs: FeatureStore, top: str, params: dict | None):
    """A TopHead for the store's extractor: the store must hold the top's boundary maps, unpooled, and
    the top starts from the extractor's own weights."""
    from convcache.train.top import TopHead, boundary_of

    ext = fs.extractor("train")
    boundary = boundary_of(top)
    if ext.layer != boundary or ext.pooling:
        raise ConvcacheError(f"--train-top {top} trains on cached {boundary} maps; this store holds "
                             f"{ext.layer}{' ' + ext.pooling + '-pooled' if ext.pooling else ''} "
                             f"features. Export with `--layer {boundary}` (no --pooling) and extract again")
    return TopHead(top=top, weights=ext.weights_source or "hed", weights_seed=ext.weights_seed,
                   weights_sha256=ext.weights_sha256, input_size=ext.size,
                   maps_shape=tuple(fs.feature_shape("train")), **(params or {}))
