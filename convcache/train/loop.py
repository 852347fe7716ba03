"""The one epoch loop that trains the dense head, on cached features or end to end.

`DenseHead` (features from the cache) and the reference (pixels through the frozen base) both train
through `fit_epochs`: the same `train_on_batch` steps, the same per-epoch evaluation, the same epoch
selection rule (convcache.protocol.EpochSelector). What differs is only where a batch comes from.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable

import numpy as np
from tqdm import tqdm

from convcache.protocol import EpochSelector


def compile_head_model(keras, model, n_classes: int, learning_rate: float) -> None:
    """RMSprop and the loss, XLA-compiled: the book's head has 2.1M parameters at block5_pool and a step is
    dominated by RMSprop's element-wise update, which XLA fuses (~1.5x faster per step on a 2-core CPU).
    Cached heads and the end-to-end reference compile the same way, so replay stays exact.
    CONVCACHE_XLA=0 turns it off (the test suite does: a compile costs more than a tiny fixture's training)."""
    import os

    loss = "binary_crossentropy" if n_classes == 2 else "sparse_categorical_crossentropy"
    model.compile(optimizer=keras.optimizers.RMSprop(learning_rate), loss=loss, metrics=["accuracy"],
                  jit_compile=os.environ.get("CONVCACHE_XLA", "1") != "0")


def fit_epochs(model, epochs: int, batches: Callable[[int], Iterable], evaluate: Callable[[], dict],
               patience: int | None = None, progress: bool = False, desc: str = "train",
               epoch_info: Callable[[int], dict] | None = None) -> tuple[list[dict], EpochSelector]:
    """Train for up to `epochs`; `batches(e)` yields (x, y) for epoch e (0-based); `evaluate()` returns
    {"select": (loss, acc), "report": (loss, acc) or None}. Restores the selected epoch's weights.

    Each history row has `train_loss_mean` / `train_accuracy_mean`: the means over the epoch's batches,
    weighted by batch size, as Keras' `fit` reports an epoch (with dropout active, as in training). A
    `report_*` entry, when present, is for learning curves only: nothing is selected on it."""
    selector = EpochSelector(patience)
    history = []
    bar = tqdm(total=epochs, desc=desc, unit="epoch", disable=not progress, leave=False)
    for e in range(epochs):
        model.reset_metrics()
        loss_sum = acc_sum = 0.0
        steps = seen = 0
        t0 = time.perf_counter()
        for x, y in batches(e):
            loss, acc = model.train_on_batch(x, y)  # this batch's values (train_on_batch resets the metrics)
            loss_sum += float(loss) * len(y)
            acc_sum += float(acc) * len(y)
            steps, seen = steps + 1, seen + len(y)
        t1 = time.perf_counter()
        ev = evaluate()
        t2 = time.perf_counter()
        row = {"epoch": e + 1, "steps": steps, "train_loss_mean": loss_sum / seen if seen else math.nan,
               "train_accuracy_mean": acc_sum / seen if seen else math.nan,
               "select_loss": float(ev["select"][0]), "select_accuracy": float(ev["select"][1]),
               "train_seconds": t1 - t0, "eval_seconds": t2 - t1}
        if ev.get("report") is not None:
            row.update({"report_loss": float(ev["report"][0]), "report_accuracy": float(ev["report"][1])})
        if epoch_info:
            row.update(epoch_info(e))
        history.append(row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['train_loss_mean']:.4f}", select_loss=f"{row['select_loss']:.4f}")
        if selector.update(e + 1, row["select_loss"], model.get_weights):
            break
    bar.close()
    model.set_weights(selector.best_state)
    return history, selector


def evaluate_model(model, x, y, batch_size: int = 256) -> tuple[float, float]:
    """Loss and accuracy as Keras' `evaluate` computes them (probabilities clipped to [1e-7, 1 - 1e-7];
    binary accuracy at 0.5), from `predict_on_batch` in chunks: `evaluate` rebuilds its data iterator on
    every call, which cost more than the forward pass itself for a 500-row split evaluated every epoch."""
    p = np.concatenate([np.asarray(model.predict_on_batch(x[b : b + batch_size]), np.float64)
                        for b in range(0, len(x), batch_size)])
    y = np.asarray(y)
    eps = 1e-7
    p = np.clip(p, eps, 1 - eps)
    if p.shape[1] == 1:
        p, t = p[:, 0], y.astype(np.float64)
        loss = -np.mean(t * np.log(p) + (1 - t) * np.log(1 - p))
        acc = np.mean((p > 0.5) == (t > 0.5))
    else:
        loss = -np.mean(np.log(p[np.arange(len(y)), y.astype(int)]))
        acc = np.mean(p.argmax(1) == y)
    return float(loss), float(acc)


def batches_of(x_fn, y: np.ndarray, order: np.ndarray, batch_size: int):
    """Yield (x_fn(indices), y[indices]) over `order` in batches."""
    for b in range(math.ceil(len(order) / batch_size)):
        idx = order[b * batch_size : (b + 1) * batch_size]
        yield x_fn(idx), y[idx]


def fit_frozen_then_fine_tuned(keras, model, n_classes: int, learning_rate: float, epochs: int,
                               fine_tune_epochs: int, batches: Callable[[int], Callable[[int], Iterable]],
                               evaluate: Callable[[], dict], patience: int | None, progress: bool,
                               unfreeze: Callable[[], None], names: tuple[str, str],
                               epoch_info: Callable[[int, str], Callable[[int], dict]],
                               on_fine_tuned: Callable[[], None] | None = None) -> tuple[list[dict], dict]:
    """The book's two phases: `epochs` with the base frozen at `learning_rate`, then (when
    `fine_tune_epochs`) `unfreeze()` and `fine_tune_epochs` more at half the rate. `batches(offset)` gives
    the phase's `batches(e)`, whose epochs continue the frozen phase's (the replay schedule's copies go on).
    Each phase selects its epoch on the select half; the fine-tuned phase is kept only if its best
    select-half loss is lower, otherwise the frozen phase's best weights are restored. `names`: the two
    phases' names. Returns the history (epochs numbered across both phases) and the kept epoch."""
    frozen_name, fine_name = names
    compile_head_model(keras, model, n_classes, learning_rate)
    history, selector = fit_epochs(model, epochs, batches(0), evaluate, patience, progress, frozen_name,
                                   epoch_info(0, "frozen"))
    best = {"phase": "frozen", "epoch": selector.best_epoch, "select_loss": selector.best_loss}
    if not fine_tune_epochs:
        return history, best
    unfreeze()
    compile_head_model(keras, model, n_classes, learning_rate / 2)
    ft, ft_selector = fit_epochs(model, fine_tune_epochs, batches(len(history)), evaluate, patience, progress,
                                 fine_name, epoch_info(len(history), fine_name))
    for h in ft:
        h["epoch"] += len(history)
    if on_fine_tuned is not None:
        on_fine_tuned()
    if ft_selector.best_loss < selector.best_loss:
        best = {"phase": fine_name, "epoch": len(history) + ft_selector.best_epoch,
                "select_loss": ft_selector.best_loss}
    else:
        model.set_weights(selector.best_state)
    return history + ft, best
