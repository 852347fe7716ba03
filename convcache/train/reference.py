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

from convcache.augment import AugmentPolicy, augment
from convcache.backbone import keras_model, weights
from convcache.datasets import discover
from convcache.errors import ConvcacheError, ImageError
from convcache.imaging import read_and_decode
from convcache.train.heads import dense_head_layers
from convcache.train.metrics import evaluate, write_metrics
from convcache.tfquiet import import_keras

log = logging.getLogger(__name__)


def _decode_split(items, size: int, workers: int = 2):
    def load(item):
        try:
            data, pixels = read_and_decode(item.path, size)
        except ImageError:
            return None
        return pixels, item.label, hashlib.sha256(data).hexdigest()

    with ThreadPoolExecutor(workers) as pool:
        rows = [r for r in pool.map(load, items) if r is not None]
    if len(rows) < len(items):
        log.warning("reference: skipped %d unreadable images", len(items) - len(rows))
    if not rows:
        return None
    pixels, labels, shas = zip(*rows)
    return np.stack(pixels), np.array(labels), list(shas)


def build_model(keras, base, n_classes: int, layer: str | None = None, pooling: str | None = None,
                units: int = 256, dropout: float = 0.5):
    """The export stage's Keras extractor (same cut, pooling, preprocessing), frozen, + the dense head."""
    base.trainable = False
    extractor = keras_model.build_extractor(base, layer, pooling)
    inputs = keras.Input(base.input_shape[1:], dtype="float32", name="images")
    x = extractor(inputs, training=False)
    outputs = dense_head_layers(keras, n_classes, units, dropout)(keras.layers.Flatten()(x))
    return keras.Model(inputs, outputs)


def run_reference(data: str, weights_source: str, out_dir: str, epochs: int = 3, use_augment: bool = True,
                  input_size: int = 150, batch_size: int = 32, seed: int = 0, fine_tune: str | None = None,
                  fine_tune_epochs: int = 2, policy: AugmentPolicy | None = None,
                  learning_rate: float = 2e-5, layer: str | None = None, pooling: str | None = None) -> dict:
    if fine_tune not in (None, "block5"):
        raise ConvcacheError(f"--fine-tune {fine_tune}: only block5 is supported")
    if epochs < 1:
        raise ConvcacheError("--epochs must be >= 1")
    policy = policy or AugmentPolicy()
    _, keras = import_keras()
    items, classes = discover(data)
    splits = {s: _decode_split([i for i in items if i.split == s], input_size) for s in ("train", "validation", "test")}
    if splits["train"] is None:
        raise ConvcacheError(f"--data {data}: no readable training images")
    if splits["validation"] is None:
        raise ConvcacheError(f"--data {data}: the reference selects its best epoch on a validation split; none found")
    keras.utils.set_random_seed(seed)
    base = weights.load_vgg16(weights_source, input_size, seed)
    model = build_model(keras, base, len(classes), layer, pooling)
    loss = "binary_crossentropy" if len(classes) == 2 else "sparse_categorical_crossentropy"
    model.compile(keras.optimizers.RMSprop(learning_rate), loss=loss, metrics=["accuracy"])

    x_train, y_train, shas = splits["train"]
    x_val, y_val, _ = splits["validation"]
    rng = np.random.default_rng(seed)
    history, best = [], (-1.0, None)
    phases = [("frozen", epochs)] + ([("fine-tune block5", fine_tune_epochs)] if fine_tune else [])
    start = time.perf_counter()
    epoch = 0
    for phase, n_epochs in phases:
        if phase.startswith("fine-tune"):
            base.trainable = True
            for conv_layer in base.layers:
                conv_layer.trainable = conv_layer.name.startswith("block5")
            model.compile(keras.optimizers.RMSprop(learning_rate / 2), loss=loss, metrics=["accuracy"])
        for _ in range(n_epochs):
            copy = epoch + 1 if use_augment else 0
            order = rng.permutation(len(y_train))
            t0 = time.perf_counter()
            train_loss, train_acc = _train_epoch(model, x_train, y_train, shas, order, batch_size, policy, seed, copy)
            t1 = time.perf_counter()
            val_loss, val_acc = model.evaluate(x_val.astype(np.float32), y_val, batch_size=64, verbose=0)
            t2 = time.perf_counter()
            history.append({"epoch": epoch + 1, "phase": phase, "train_loss": train_loss, "train_accuracy": train_acc,
                            "val_loss": float(val_loss), "val_accuracy": float(val_acc), "train_seconds": t1 - t0,
                            "val_seconds": t2 - t1})
            log.info("epoch %d (%s): val_accuracy %.4f, %.0fs", epoch + 1, phase, val_acc, t2 - t0)
            if val_acc > best[0]:
                best = (float(val_acc), model.get_weights())
            epoch += 1
    total = time.perf_counter() - start
    model.set_weights(best[1])

    n = len(classes)
    metrics = {
        "method": "reference", "head": "dense", "augment": use_augment, "epochs": epochs,
        "fine_tune": fine_tune, "fine_tune_epochs": fine_tune_epochs if fine_tune else 0, "classes": classes,
        "fit_seconds": total, "seconds_per_epoch": float(np.mean([h["train_seconds"] for h in history])),
        "history": history, "best_epoch": int(np.argmax([h["val_accuracy"] for h in history])) + 1,
        "rows": {"train": int(len(y_train) * epoch)},
        "provenance": {"data": str(data), "weights": weights_source, "weights_sha256": weights.weights_sha256(base),
                       "input_size": input_size, "layer": layer or "block5_pool", "pooling": pooling,
                       "learning_rate": learning_rate, "policy": policy.to_dict() if use_augment else None, "seed": seed},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    for name in ("validation", "test"):
        if splits[name] is not None:
            x, y, _ = splits[name]
            metrics[name] = evaluate(_proba(model, x), y, n)
            metrics["rows"][name] = int(len(y))
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    write_metrics(Path(out_dir) / "metrics.json", metrics)
    return metrics


def _train_epoch(model, x, y, shas, order, batch_size, policy, seed, copy):
    """One pass; returns the epoch's mean loss and accuracy (train_on_batch keeps running means)."""
    model.reset_metrics()
    loss = acc = float("nan")
    for b in range(math.ceil(len(order) / batch_size)):
        idx = order[b * batch_size : (b + 1) * batch_size]
        batch = np.stack([augment(x[i], policy, seed, shas[i], copy) for i in idx]).astype(np.float32)
        loss, acc = model.train_on_batch(batch, y[idx])
    return float(loss), float(acc)


def _proba(model, x) -> np.ndarray:
    p = np.asarray(model.predict(x.astype(np.float32), batch_size=64, verbose=0))
    return np.concatenate([1 - p, p], 1) if p.shape[1] == 1 else p
