"""reference: VGG16's frozen conv base + the same dense head, trained end to end in TensorFlow with
on-the-fly augmentation (Chollet's method 2), optionally followed by fine-tuning block5.

Fairness: the same decoding (convcache.imaging), the same augmentation code and policy
(convcache.augment), the same head layers (dense_head_layers) and optimiser as the cached heads.
Epoch e (0-based) sees copy e+1 of every image, which are exactly the copies extract caches.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from tqdm import tqdm

from convcache.augment import augment
from convcache.backbone import keras_model, weights
from convcache.datasets import discover
from convcache.errors import ConvcacheError, ImageError
from convcache.imaging import read_and_decode
from convcache.protocol import BOOK_DROPOUT, BOOK_UNITS, initial_head_weights, replay_copy, validation_halves
from convcache.tfquiet import import_keras
from convcache.train.config import ReferenceConfig
from convcache.train.heads import dense_head_layers
from convcache.train.loop import evaluate_model, fit_frozen_then_fine_tuned
from convcache.train.metrics import evaluate, write_metrics

log = logging.getLogger(__name__)


def _decode_split(items, size: int, workers: int = 2, progress: bool = False, desc: str = "decode"):
    """Decoded images of a split in canonical order (ascending sha256, duplicates kept once)."""
    def load(item):
        try:
            data, pixels = read_and_decode(item.path, size)
        except ImageError as exc:
            return item, exc.reason
        return pixels, item.label, hashlib.sha256(data).hexdigest()

    rows, skipped = {}, {}
    with ThreadPoolExecutor(workers) as pool:
        for r in tqdm(pool.map(load, items), total=len(items), desc=desc, unit="img", disable=not progress,
                      leave=False):
            if len(r) == 2:
                skipped[r[0].path] = r[1]
            else:
                rows.setdefault(r[2], r)
    for path, reason in sorted(skipped.items()):
        log.warning("reference: skipped %s: %s", path, reason)
    if not rows:
        return None
    pixels, labels, shas = zip(*(rows[s] for s in sorted(rows)))
    return np.stack(pixels), np.array(labels), list(shas)


def build_model(keras, base, n_classes: int, layer: str | None = None, pooling: str | None = None,
                units: int = BOOK_UNITS, dropout: float = BOOK_DROPOUT, seed: int = 0, preprocess: str = "caffe",
                scaler: tuple | None = None):
    """The export stage's Keras extractor (same cut, pooling, preprocessing), frozen, + the dense head,
    starting from the protocol's initial head weights (the same as DenseHead's for the same seed).
    `scaler` = (mean, scale): the features are standardised before the head, as DenseHead(standardize=True)
    does on cached features."""
    base.trainable = False
    extractor = keras_model.build_extractor(base, layer, pooling, preprocess)
    inputs = keras.Input(base.input_shape[1:], dtype="float32", name="images")
    x = keras.layers.Flatten()(extractor(inputs, training=False))
    if scaler is not None:
        mean, scale = (np.asarray(v, np.float32) for v in scaler)
        x = keras.layers.Lambda(lambda t: (t - mean) / scale, name="standardize")(x)
    head = dense_head_layers(keras, n_classes, units, dropout, seed)
    model = keras.Model(inputs, head(x))
    head.set_weights(initial_head_weights(int(x.shape[-1]), units, n_classes, seed))
    return model, extractor


def run_reference(cfg: ReferenceConfig) -> dict:
    """Method 2 (or fine-tuning) end to end, as `cfg` says (validated when it was built). `cfg.seed` sets
    the initial head weights, the batch order and dropout (and weights "random"); `cfg.augment_seed` the
    copies, as `extract --seed` does."""
    _, keras = import_keras()
    splits, classes = _load_splits(cfg)
    base = weights.load_vgg16(cfg.weights, cfg.input_size, cfg.seed)
    scaler = (_feature_scaler(keras, base, splits["train"][0], cfg.layer, cfg.pooling, cfg.preprocess)
              if cfg.standardize else None)
    model, _ = build_model(keras, base, len(classes), cfg.layer, cfg.pooling, cfg.units, cfg.dropout, cfg.seed,
                           cfg.preprocess, scaler)
    initial_weights_sha256 = weights.weights_sha256(base)
    if cfg.unfreeze == "all":  # no layer is frozen: nothing is fixed, so nothing can be cached
        base.trainable = True
        log.warning("reference --unfreeze all: every conv layer trains; no layer's output is fixed, so this run "
                    "cannot be cached and pays the whole base forward and backward every step")
    halves = _halves(splits["validation"])
    start = time.perf_counter()
    history, best = _train(keras, cfg, model, base, splits["train"], halves, len(classes))
    metrics = _metrics(cfg, classes, history, best, time.perf_counter() - start, len(splits["train"][1]), halves)
    metrics["base_weights_changed"] = weights.weights_sha256(base) != initial_weights_sha256
    metrics["provenance"]["weights_sha256"] = initial_weights_sha256
    _evaluate_splits(model, metrics, halves, splits["test"], len(classes))
    Path(cfg.output).mkdir(parents=True, exist_ok=True)
    write_metrics(Path(cfg.output) / "metrics.json", metrics)
    return metrics


def _load_splits(cfg: ReferenceConfig) -> tuple[dict, list[str]]:
    items, classes = discover(cfg.data)
    splits = {s: _decode_split([i for i in items if i.split == s], cfg.input_size, progress=cfg.progress,
                               desc=f"decode {s}")
              for s in ("train", "validation", "test")}
    if splits["train"] is None:
        raise ConvcacheError(f"--data {cfg.data}: no readable training images")
    if splits["validation"] is None:
        raise ConvcacheError(f"--data {cfg.data}: the reference selects its best epoch on a validation split; "
                             "none found")
    return splits, classes


def _halves(validation) -> dict:
    """The select and report halves of validation (convcache.protocol.validation_halves), as float32."""
    x_val, y_val, val_shas = validation
    sel, rep = validation_halves(val_shas, y_val)
    return {"select": (x_val[sel].astype(np.float32), y_val[sel]),
            "report": (x_val[rep].astype(np.float32), y_val[rep]), "report_sha256": [val_shas[i] for i in rep]}


def _train(keras, cfg: ReferenceConfig, model, base, train, halves: dict, n_classes: int):
    """The frozen phase (and block5's fine-tuning), each epoch's batches augmented on the fly: epoch e
    sees copy e + 1 of every image, in the order DenseHead's replay schedule draws from the same seed."""
    x_train, y_train, shas = train
    (xs, ys), (xr, yr) = halves["select"], halves["report"]
    rng = np.random.default_rng(cfg.seed)  # the same stream of epoch orders as DenseHead's replay schedule

    def evaluate():
        return {"select": evaluate_model(model, xs, ys, 32), "report": evaluate_model(model, xr, yr, 32)}

    def make_batches(offset):
        def batches(e):
            copy = replay_copy(offset + e, 10**9) if cfg.augment else 0
            order = rng.permutation(len(y_train))
            steps = math.ceil(len(order) / cfg.batch_size)
            bar = tqdm(total=steps, desc=f"reference epoch {offset + e + 1}", unit="step", disable=not cfg.progress,
                       leave=False)
            for b in range(steps):
                idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
                pixels = np.stack([augment(x_train[i], cfg.policy, cfg.augment_seed, shas[i], copy) for i in idx])
                yield pixels.astype(np.float32), y_train[idx]
                bar.update(1)
            bar.close()
        return batches

    def info_from(offset, phase):
        return lambda e: {"phase": phase, "copies": [replay_copy(offset + e, 10**9) if cfg.augment else 0]}

    def unfreeze_block5():
        base.trainable = True
        for conv_layer in base.layers:
            conv_layer.trainable = conv_layer.name.startswith("block5")

    return fit_frozen_then_fine_tuned(
        keras, model, n_classes, cfg.learning_rate, cfg.epochs, cfg.fine_tune_epochs if cfg.fine_tune else 0,
        make_batches, evaluate, cfg.patience, cfg.progress, unfreeze_block5, ("reference", "fine-tune block5"),
        info_from)


def _metrics(cfg: ReferenceConfig, classes, history, best, seconds: float, n_train: int, halves: dict) -> dict:
    return {
        "method": "reference", "head": "dense", "augment": cfg.augment, "epochs": cfg.epochs,
        "fine_tune": cfg.fine_tune, "fine_tune_epochs": cfg.fine_tune_epochs if cfg.fine_tune else 0,
        "classes": classes,
        "fit_seconds": seconds, "seconds_per_epoch": float(np.mean([h["train_seconds"] for h in history])),
        "selection": {"rule": "lowest select-half loss" + (f", patience {cfg.patience}" if cfg.patience else ""),
                      "best": best, "epochs_run": len(history), "steps": int(sum(h["steps"] for h in history)),
                      "copies_used": sorted({c for h in history for c in h["copies"]}), "history": history},
        "history": history, "best_epoch": best["epoch"],
        "rows": {"train": int(n_train * len(history)), "select": int(len(halves["select"][1])),
                 "report": int(len(halves["report"][1]))},
        "unfreeze": cfg.unfreeze, "cacheable": cfg.unfreeze is None and not cfg.fine_tune,
        "provenance": {"data": str(cfg.data), "weights": cfg.weights, "input_size": cfg.input_size,
                       "layer": cfg.layer or "block5_pool", "pooling": cfg.pooling, "preprocess": cfg.preprocess,
                       "standardize": cfg.standardize, "learning_rate": cfg.learning_rate,
                       "batch_size": cfg.batch_size, "policy": cfg.policy.to_dict() if cfg.augment else None,
                       "seed": cfg.seed, "augment_seed": cfg.augment_seed},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _evaluate_splits(model, metrics: dict, halves: dict, test, n_classes: int) -> None:
    (xs, ys), (xr, yr) = halves["select"], halves["report"]
    metrics["select"] = _evaluate(model, xs, ys, n_classes)
    metrics["report"] = _evaluate(model, xr, yr, n_classes)
    proba = _proba(model, xr)
    metrics["report_correct"] = (proba.argmax(1) == yr).astype(int).tolist()
    metrics["report_proba"] = proba.astype(float).tolist()
    metrics["report_sha256"] = halves["report_sha256"]
    if test is not None:
        x, y, _ = test
        metrics["test"] = _evaluate(model, x, y, n_classes)
        metrics["rows"]["test"] = int(len(y))


def _feature_scaler(keras, base, pixels, layer, pooling, preprocess) -> tuple:
    """The standardisation DenseHead(standardize=True) fits on cached originals, fit here on the frozen
    extractor's features of the training originals (un-augmented), as float64 statistics."""
    from sklearn.preprocessing import StandardScaler

    extractor = keras_model.build_extractor(base, layer, pooling, preprocess)
    scaler = StandardScaler()
    for b in range(0, len(pixels), 256):
        f = np.asarray(extractor.predict(pixels[b : b + 256].astype(np.float32), batch_size=32, verbose=0))
        scaler.partial_fit(f.reshape(len(f), -1).astype(np.float64))
    return scaler.mean_.astype(np.float32), scaler.scale_.astype(np.float32)


def _evaluate(model, x, y, n):
    return evaluate(_proba(model, x), y, n)


def _proba(model, x) -> np.ndarray:
    p = np.asarray(model.predict(x.astype(np.float32), batch_size=32, verbose=0))
    return np.concatenate([1 - p, p], 1) if p.shape[1] == 1 else p
