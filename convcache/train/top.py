"""Cache at the freeze boundary: fine-tuning VGG16's block5 on cached block4_pool maps.

When block5 is fine-tuned, blocks 1-4 stay frozen, so their output (block4_pool) is a fixed function
of each augmented copy: it can be extracted once and cached like any feature. `TopHead` rebuilds
block5 (initialised from the extractor's own weights, layer by layer, by name) under the dense head
and trains both on the cached maps exactly as the end-to-end reference fine-tunes (`reference
--fine-tune block5`): `epochs` epochs with block5 frozen, then `fine_tune_epochs` with block5
trainable at half the learning rate, the same batch order, copies, initial head weights, dropout
masks and epoch selection. Only block5 and the head run per step; blocks 1-4 ran once, at extraction.
"""

from __future__ import annotations

import time

import numpy as np
import onnx
from sklearn.utils.validation import check_is_fitted

from convcache.artifacts import FEATURES, PROBABILITIES
from convcache.artifacts.convert import DEFAULT_OPSET
from convcache.errors import ConvcacheError
from convcache.protocol import (
    BOOK_BATCH_SIZE,
    BOOK_DROPOUT,
    BOOK_LEARNING_RATE,
    BOOK_UNITS,
    SCHEDULES,
    initial_head_weights,
)
from convcache.train.heads import DenseHead, _Schedule, dense_head_layers, set_params
from convcache.train.loop import evaluate_model, fit_frozen_then_fine_tuned

SEGMENT_ROWS = 2048  # rows read from the store at once (an epoch of the shared data's replay: one read)
# trainable top -> (the cached boundary layer it starts from, its layers in order)
TOPS = {"block5": ("block4_pool", ("block5_conv1", "block5_conv2", "block5_conv3", "block5_pool"))}


def boundary_of(top: str) -> str:
    if top not in TOPS:
        raise ConvcacheError(f"--train-top {top}: choose {', '.join(TOPS)}")
    return TOPS[top][0]


def build_top(keras, top: str, maps_shape: tuple, weights_source: str, input_size: int, weights_seed: int = 0,
              expected_sha256: str | None = None):
    """VGG16's `top` layers as a model on the boundary maps, with the weights of `weights_source`
    (checked against the extractor's recorded weights when `expected_sha256` is given)."""
    from convcache.backbone import weights

    base = weights.load_vgg16(weights_source, input_size, weights_seed)
    if expected_sha256 and weights.weights_sha256(base) != expected_sha256:
        raise ConvcacheError(f"the {top} weights from --weights {weights_source} are not the extractor's (its base "
                             f"has sha256 {expected_sha256[:12]}); pass the weights (and seed) the extractor used")
    inputs = keras.Input(tuple(maps_shape), dtype="float32", name=FEATURES)
    x = inputs
    for name in TOPS[top][1]:
        x = base.get_layer(name)(x)
    return keras.Model(inputs, x, name=f"top_{top}")


class TopHead(DenseHead):
    """VGG16's `top` (block5) + the dense head on cached boundary maps (block4_pool), fine-tuned as the
    reference fine-tunes. `X` may be maps (n, h, w, c) or their flattened rows; `fit` also takes a
    `fetch(rows)` callable instead of X, so that each epoch's rows are read from the store (chunk by
    chunk) rather than held in memory. The dense head's parameters keep their meaning; `epochs` is the
    frozen phase."""

    standardize = False  # the top trains on raw maps: not one of its parameters

    def __init__(self, top: str = "block5", weights: str = "hed", input_size: int = 150, weights_seed: int = 0,
                 weights_sha256: str | None = None, maps_shape: tuple | None = None, units: int = BOOK_UNITS,
                 dropout: float = BOOK_DROPOUT, epochs: int = 3, fine_tune_epochs: int = 2,
                 batch_size: int = BOOK_BATCH_SIZE, learning_rate: float = BOOK_LEARNING_RATE,
                 patience: int | None = None, schedule: str = "replay", steps_per_epoch: int | None = None,
                 seed: int = 0, progress: bool = False):
        set_params(self, locals())

    def _maps(self, X) -> np.ndarray:
        X = np.asarray(X, np.float32)
        return X.reshape(len(X), *self.maps_shape_)

    def fit(self, X, y, X_val=None, y_val=None, image=None, copy=None, fetch=None) -> TopHead:
        from convcache.tfquiet import import_keras

        if self.schedule not in SCHEDULES:
            raise ConvcacheError(f"unknown schedule {self.schedule!r}; choose {', '.join(SCHEDULES)}")
        if self.epochs < 1 or self.fine_tune_epochs < 0:
            raise ConvcacheError("--epochs must be >= 1 and --fine-tune-epochs >= 0")
        if X_val is None:
            raise ConvcacheError("the top is fine-tuned with its epochs selected on the select half of validation")
        _, keras = import_keras()
        y = np.asarray(y)
        self.classes_ = np.unique(y)
        if not np.array_equal(self.classes_, np.arange(len(self.classes_))):
            raise ConvcacheError("labels must be 0..n_classes-1")
        self.maps_shape_ = tuple(int(d) for d in (self.maps_shape or np.asarray(X).shape[1:]))
        if len(self.maps_shape_) != 3:
            raise ConvcacheError(f"the top trains on feature maps (h, w, c), got shape {self.maps_shape_}")
        fetch = fetch or (lambda rows: np.asarray(X)[rows])
        image = np.arange(len(y)) if image is None else np.asarray(image)
        copy = np.zeros(len(y), np.int64) if copy is None else np.asarray(copy)
        plan = _Schedule(self.schedule, image, copy, self.batch_size, self.steps_per_epoch, self.seed)
        Xv = self._maps(X_val)
        n = len(self.classes_)

        keras.utils.set_random_seed(self.seed)
        self.top_model_ = build_top(keras, self.top, self.maps_shape_, self.weights, self.input_size,
                                    self.weights_seed, self.weights_sha256)
        self.top_model_.trainable = False
        inputs = keras.Input(self.maps_shape_, dtype="float32", name=FEATURES)
        x = keras.layers.Flatten()(self.top_model_(inputs, training=False))
        head = dense_head_layers(keras, n, self.units, self.dropout, self.seed)
        self.model_ = keras.Model(inputs, head(x))
        head.set_weights(initial_head_weights(int(x.shape[-1]), self.units, n, self.seed))
        initial_top = [w.copy() for w in self.top_model_.get_weights()]
        self.top_changed_ = False  # did fine-tuning move block5 (even if the frozen phase's weights are kept)?

        segment = self.batch_size * -(-SEGMENT_ROWS // self.batch_size)  # whole batches per read

        def batches(offset):
            def epoch_batches(e):
                rows = plan.rows(offset + e)
                for s in range(0, len(rows), segment):  # replay: one read per epoch; pool: bounded reads
                    seg = rows[s : s + segment]
                    Xs = self._maps(fetch(seg))  # from the store: only these rows, chunk by chunk
                    for b in range(0, len(seg), self.batch_size):
                        yield Xs[b : b + self.batch_size], y[seg[b : b + self.batch_size]]
            return epoch_batches

        def info(offset, phase):
            return lambda e: {"phase": phase, **plan.info(offset + e)}

        def evaluate():
            return {"select": evaluate_model(self.model_, Xv, y_val, 32)}

        def unfreeze():
            self.top_model_.trainable = True

        def top_changed():  # did fine-tuning move block5 (even if the frozen phase's weights are kept)?
            self.top_changed_ = any(not np.array_equal(a, b) for a, b in zip(initial_top,
                                                                               self.top_model_.get_weights()))

        start = time.perf_counter()
        history, best = fit_frozen_then_fine_tuned(
            keras, self.model_, n, self.learning_rate, self.epochs, self.fine_tune_epochs, batches, evaluate,
            self.patience, self.progress, unfreeze, (f"top frozen ({self.schedule})", f"fine-tune {self.top}"),
            info, top_changed)
        self.fit_seconds_ = time.perf_counter() - start
        self.history_ = history
        self.best_ = best
        self.epochs_run_ = len(history)
        self.best_epoch_ = best["epoch"]
        self.steps_run_ = int(sum(h["steps"] for h in history))
        self.copies_used_ = sorted({int(c) for h in history for c in h.get("copies", [])})
        self.n_features_in_ = int(np.prod(self.maps_shape_))
        return self

    def predict_proba(self, X) -> np.ndarray:
        check_is_fitted(self, "model_")
        return self._proba(self._maps(X))  # boundary maps, not flat rows: DenseHead's row checks do not apply

    def summary(self) -> dict:
        return {"schedule": self.schedule, "top": self.top, "cached_boundary": TOPS[self.top][0],
                "trained_layers": list(TOPS[self.top][1]) + ["head"], "epochs_run": self.epochs_run_,
                "frozen_epochs": self.epochs, "fine_tune_epochs": self.fine_tune_epochs, "best": self.best_,
                "best_epoch": self.best_epoch_, "steps": self.steps_run_, "batch_size": self.batch_size,
                "learning_rate": self.learning_rate, "copies_used": self.copies_used_,
                "top_weights_changed": self.top_changed_,
                "seconds_per_epoch": self.fit_seconds_ / max(self.epochs_run_, 1),
                "rule": "lowest select-half loss per phase, the fine-tuned phase kept only if lower",
                "history": self.history_}

    def to_onnx(self, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
        """The trained top + head: boundary maps `features` (n, h, w, c) -> `probabilities`. Written from the
        weights, no converter: block5 by `artifacts.keras_onnx` (what export writes the extractor with), then
        Flatten (Keras' NHWC order) and the dense head (`artifacts.convert.dense_to_onnx`, dropout the
        identity at inference)."""
        from onnx import helper

        from convcache.artifacts import keras_onnx
        from convcache.artifacts.convert import dense_to_onnx

        check_is_fitted(self, "model_")
        top = keras_onnx.to_onnx(self.top_model_, FEATURES, "top_maps", opset, fold_bgr=False)
        dense = [lay for lay in self.model_.get_layer("head").layers if lay.__class__.__name__ == "Dense"]
        head = dense_to_onnx(tuple(dense[0].get_weights()), tuple(dense[1].get_weights()), "top_flat",
                             PROBABILITIES, opset)
        graph = top.graph
        graph.node.append(helper.make_node("Flatten", ["top_maps"], ["top_flat"], axis=1, name="top_flatten"))
        graph.node.extend(head.graph.node)
        graph.initializer.extend(head.graph.initializer)
        del graph.output[:]
        graph.output.extend(head.graph.output)
        del top.opset_import[:]
        top.opset_import.extend(head.opset_import)  # the default domain only
        top.producer_name = head.producer_name
        onnx.checker.check_model(top, full_check=True)
        return top
