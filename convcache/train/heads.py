"""Heads on cached features, following scikit-learn's conventions: __init__ stores parameters,
fit returns self, learned attributes end in '_'. Each exports itself to ONNX with one input,
`features` (batch, n_features), and one output, `probabilities` (batch, n_classes)."""

from __future__ import annotations

import logging
import time
import warnings

import numpy as np
import onnx
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.validation import check_is_fitted

from convcache.artifacts import FEATURES, PROBABILITIES
from convcache.artifacts.convert import DEFAULT_OPSET, dense_to_onnx, linear_to_onnx
from convcache.errors import ConvcacheError
from convcache.protocol import (
    BOOK_BATCH_SIZE,
    BOOK_DROPOUT,
    BOOK_EPOCHS,
    BOOK_LEARNING_RATE,
    BOOK_UNITS,
    LOGREG_CS,
    SCHEDULES,
    initial_head_weights,
    logreg_search,
    replay_copy,
)
from convcache.train.loop import batches_of, compile_head_model, evaluate_model, fit_epochs

log = logging.getLogger(__name__)


def _hold_out_images(X, y, image, copy, seed, fraction: float = 0.1):
    """Split off ~`fraction` of the images (every copy of them), stratified by class; the held-out
    images' originals (copy 0, or their first copy) become the select split. Ranks are re-numbered."""
    rng = np.random.default_rng([seed, 7])
    held = set()
    for cls in np.unique(y):
        imgs = np.unique(image[y == cls])
        held.update(rng.choice(imgs, max(1, int(round(fraction * len(imgs)))), replace=False).tolist())
    out = np.isin(image, list(held))
    if out.all():
        raise ConvcacheError("too few images to hold out a select split; pass X_val")
    val_rows = np.flatnonzero(out & (copy == copy[out].min()))
    keep = np.flatnonzero(~out)
    _, new_rank = np.unique(image[keep], return_inverse=True)
    return X[keep], y[keep], X[val_rows], y[val_rows], new_rank, copy[keep]



def set_params(estimator, params: dict) -> None:
    """scikit-learn's __init__ contract: store every constructor argument, unchanged, under its own name
    (`get_params` and `clone` read them back); nothing else happens in __init__."""
    for name, value in params.items():
        if name not in ("self", "__class__"):
            setattr(estimator, name, value)

class _Schedule:
    """Which rows each epoch trains on, in which order (see convcache.protocol)."""

    def __init__(self, schedule, image, copy, batch_size, steps_per_epoch, seed):
        self.schedule = schedule
        order = np.lexsort((copy, image))  # canonical: by image rank, then copy
        self.image, self.copy = image, copy
        if schedule == "replay":
            self.n_images = int(image.max()) + 1
            self.K = int(copy.max())
            self.table = np.full((self.n_images, self.K + 1), -1, np.int64)
            self.table[image, copy] = np.arange(len(image))
            needed = [0] if self.K == 0 else list(range(1, self.K + 1))
            if (self.table[:, needed] < 0).any():
                raise ConvcacheError("replay needs every image's copies 1..K in the training rows")
            self.rng = np.random.default_rng(seed)
        else:
            self.canonical = order
            self.rows_per_epoch = (steps_per_epoch * batch_size if steps_per_epoch else len(order))
            self.rng = np.random.default_rng(seed)
            self.stream = np.empty(0, np.int64)
        self._copies = {}

    def rows(self, epoch: int) -> np.ndarray:
        if self.schedule == "replay":
            order = self.rng.permutation(self.n_images)  # the e-th permutation of default_rng(seed)
            c = replay_copy(epoch, self.K)
            self._copies[epoch] = [c]
            return self.table[order, c]
        while len(self.stream) < self.rows_per_epoch:  # consecutive passes, each a fresh permutation
            self.stream = np.concatenate([self.stream, self.canonical[self.rng.permutation(len(self.canonical))]])
        rows, self.stream = self.stream[: self.rows_per_epoch], self.stream[self.rows_per_epoch :]
        self._copies[epoch] = sorted({int(c) for c in np.unique(self.copy[rows])})
        return rows

    def info(self, epoch: int) -> dict:
        return {"copies": self._copies.get(epoch, [])}


class LogRegHead(ClassifierMixin, BaseEstimator):
    """Standardization + multinomial logistic regression (the linear probe). C is chosen by accuracy on
    (X_val, y_val) - the select half of validation - or, without them, by stratified 3-fold
    cross-validation on the training data (so the head works in Pipeline, cross_val_score, grid search)."""

    def __init__(self, Cs=LOGREG_CS, max_iter: int = 300, tol: float = 1e-4):
        set_params(self, locals())

    def fit(self, X, y, X_val=None, y_val=None) -> LogRegHead:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import Pipeline
        from sklearn.preprocessing import StandardScaler
        from sklearn.utils.multiclass import check_classification_targets
        from sklearn.utils.validation import check_X_y

        X, y = check_X_y(X, y, dtype=[np.float32, np.float64])
        check_classification_targets(y)
        if not len(self.Cs):
            raise ConvcacheError("logreg needs at least one C")
        start = time.perf_counter()
        if len(self.Cs) > 1 and X_val is None:
            return self._fit_cv(X, y, start)
        scaler = StandardScaler().fit(X)
        Xs = scaler.transform(X).astype(np.float32)
        Xv = scaler.transform(X_val).astype(np.float32) if X_val is not None else None
        # Ascending C with warm starts: each fit starts from the previous, more regularised solution.
        model = LogisticRegression(C=self.Cs[0], max_iter=self.max_iter, tol=self.tol, warm_start=True)
        best, self.scores_, self.converged_ = None, {}, {}
        for C in sorted(self.Cs):
            model.set_params(C=C)
            with warnings.catch_warnings():  # said once, below, naming the C values (sklearn's says neither)
                warnings.simplefilter("ignore", ConvergenceWarning)
                model.fit(Xs, y)
            self.converged_[C] = bool(int(np.max(model.n_iter_)) < self.max_iter)
            score = float(model.score(Xv, y_val)) if Xv is not None else 0.0
            self.scores_[C] = score
            if best is None or score > best[0]:
                best = (score, C, model.coef_.copy(), model.intercept_.copy())
        model.set_params(C=best[1])
        model.coef_, model.intercept_ = best[2], best[3]
        self.C_ = best[1]
        self.selected_by_ = "validation" if Xv is not None else "single C"
        capped = [C for C, ok in self.converged_.items() if not ok]
        if capped:
            log.warning("logreg: C=%s stopped at max_iter=%d before converging (tol %g); the kept C=%g %s",
                        ", ".join(f"{C:g}" for C in capped), self.max_iter, self.tol, self.C_,
                        "did not converge either: raise max_iter" if self.C_ in capped else "converged")
        return self._finish(Pipeline([("scale", scaler), ("logreg", model)]), X, start)

    def _fit_cv(self, X, y, start) -> LogRegHead:
        folds = max(2, min(3, int(np.bincount(np.unique(y, return_inverse=True)[1]).min())))
        search = logreg_search(folds, self.Cs, self.max_iter, self.tol)
        search.fit(X, y)
        self.scores_ = {float(c): float(sc) for c, sc in zip(search.cv_results_["param_logreg__C"],
                                                              search.cv_results_["mean_test_score"])}
        self.C_ = float(search.best_params_["logreg__C"])
        self.selected_by_ = f"{folds}-fold cross-validation on train"
        return self._finish(search.best_estimator_, X, start)

    def _finish(self, pipeline, X, start) -> LogRegHead:
        self.pipeline_ = pipeline
        self.n_iter_ = pipeline[-1].n_iter_
        self.classes_ = pipeline.classes_
        self.n_features_in_ = X.shape[1]
        self.fit_seconds_ = time.perf_counter() - start
        return self

    def predict_proba(self, X) -> np.ndarray:
        check_is_fitted(self, "pipeline_")
        return self.pipeline_.predict_proba(X)

    def predict(self, X) -> np.ndarray:
        proba = self.predict_proba(X)  # checks that the head is fitted first
        return self.classes_[proba.argmax(1)]

    def summary(self) -> dict:
        out = {"C": self.C_, "selected_by": self.selected_by_,
               "accuracy_by_C": {str(k): v for k, v in self.scores_.items()}}
        if getattr(self, "converged_", None):
            out["converged_by_C"] = {str(k): v for k, v in self.converged_.items()}
        return out

    def to_onnx(self, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
        """Standard ONNX ops only (the scaler folded into the weights): runs on every runtime."""
        from sklearn.linear_model import SGDClassifier

        check_is_fitted(self, "pipeline_")
        model = self.pipeline_[-1]
        return linear_to_onnx(self.pipeline_[0], model, FEATURES, PROBABILITIES, opset,
                              "ovr" if isinstance(model, SGDClassifier) else "softmax")


class StreamingLogRegHead(ClassifierMixin, BaseEstimator):
    """The linear probe out of core, for training sets larger than memory: one pass fits the
    standardization (StandardScaler.partial_fit), then `epochs` passes of shuffled blocks train one
    averaged SGD logistic regression per regularization strength, all in the same passes. Strengths
    come from LogRegHead's C grid (alpha = 1 / (C * n_rows), the same objective), so both heads
    search the same models; the C whose final model has the best select-half accuracy is kept.

    `fit_stream(batches, classes, X_val, y_val)` takes `batches(epoch)`, an iterator of (X, y) blocks;
    `fit(X, y, X_val, y_val)` is the in-memory form (blocks of `block_rows`)."""

    def __init__(self, Cs=LOGREG_CS, epochs: int = 10, block_rows: int = 1024, seed: int = 0,
                 progress: bool = False):
        set_params(self, locals())

    def fit(self, X, y, X_val=None, y_val=None) -> StreamingLogRegHead:
        from sklearn.model_selection import train_test_split
        from sklearn.utils.multiclass import check_classification_targets
        from sklearn.utils.validation import check_X_y

        X, y = check_X_y(X, y, dtype=[np.float64, np.float32])
        check_classification_targets(y)
        if X_val is None:  # scikit-learn's fit(X, y): select on a stratified 10% of the rows (one per class at least)
            labels, counts = np.unique(y, return_counts=True)
            n_val = max(int(np.ceil(0.1 * len(y))), len(labels))
            if counts.min() >= 2 and len(y) - n_val >= len(labels):
                X, X_val, y, y_val = train_test_split(X, y, test_size=n_val, stratify=y, random_state=self.seed)
            else:  # too few rows to hold any out: C is chosen on the training rows themselves
                X_val, y_val = X, y

        def batches(epoch):
            order = np.random.default_rng([self.seed, epoch + 1]).permutation(len(y))  # epoch -1: the scaler pass
            for b in range(0, len(order), self.block_rows):
                idx = order[b : b + self.block_rows]
                yield X[idx], y[idx]

        return self.fit_stream(batches, np.unique(y), X_val, y_val)

    def fit_stream(self, batches, classes, X_val, y_val) -> StreamingLogRegHead:
        from sklearn.linear_model import SGDClassifier
        from sklearn.pipeline import Pipeline
        from sklearn.preprocessing import StandardScaler
        from tqdm import tqdm

        if X_val is None:
            raise ConvcacheError("the streaming head selects C and its epoch on the select half of validation, "
                                 "and there is none")
        if not len(self.Cs) or self.epochs < 1:
            raise ConvcacheError("the streaming head needs at least one C and one epoch")
        start = time.perf_counter()
        scaler, n = StandardScaler(), 0
        for X, _ in batches(-1):  # pass 0: the standardization, and the row count for alpha
            scaler.partial_fit(np.asarray(X, np.float64))
            n += len(X)
        classes = np.asarray(classes)
        models = {C: SGDClassifier(loss="log_loss", alpha=1.0 / (C * n), average=True, random_state=self.seed)
                  for C in self.Cs}
        Xv = scaler.transform(np.asarray(X_val, np.float64)).astype(np.float32)
        self.history_ = []
        bar = tqdm(total=self.epochs, desc="logreg (streaming)", unit="epoch", disable=not self.progress,
                   leave=False)
        for epoch in range(self.epochs):
            for X, y in batches(epoch):
                Xs = scaler.transform(np.asarray(X, np.float64)).astype(np.float32)
                for model in models.values():
                    model.partial_fit(Xs, y, classes=classes)
            self.history_.append({"epoch": epoch + 1, **{str(C): float(m.score(Xv, y_val)) for C, m in models.items()}})
            bar.update(1)
        bar.close()
        # C is chosen as LogRegHead chooses it, on the final (averaged, near-converged) models: one candidate
        # per C, not per (C, epoch), so the select half is not searched harder than the in-memory head's
        self.scores_ = {C: self.history_[-1][str(C)] for C in self.Cs}
        C = max(sorted(self.Cs), key=lambda c: self.scores_[c])  # the smallest C among ties, as LogRegHead
        model = models[C]
        self.C_, self.best_epoch_, self.n_rows_ = C, self.epochs, n
        self.pipeline_ = Pipeline([("scale", scaler), ("logreg", model)])
        self.classes_ = classes
        self.n_features_in_ = scaler.n_features_in_
        self.fit_seconds_ = time.perf_counter() - start
        return self

    predict_proba = LogRegHead.predict_proba
    predict = LogRegHead.predict
    to_onnx = LogRegHead.to_onnx

    def summary(self) -> dict:
        return {"C": self.C_, "alpha": 1.0 / (self.C_ * self.n_rows_), "best_epoch": self.best_epoch_,
                "epochs_run": self.epochs, "selected_by": "validation (select half)", "streaming": True,
                "accuracy_by_C": {str(k): v for k, v in self.scores_.items()}, "history": self.history_}


class DenseHead(ClassifierMixin, BaseEstimator):
    """Chollet's head: Dense(units, relu) -> Dropout -> sigmoid (2 classes) or softmax, RMSprop.

    Schedules (see convcache.protocol):
    - `replay`: epoch e trains on copy (e mod K) + 1 of every image, one view per image per epoch, in
      the reference's batch order: with K >= epochs this *is* method 2 (end to end, frozen base).
      Needs `image` (canonical image rank) and `copy` per row in `fit`.
    - `pool`: every epoch shuffles all rows (copies 0..K) together.
    `steps_per_epoch` (default: one pass over the epoch's rows) lets `pool` match replay's steps.
    The epoch with the lowest loss on (X_val, y_val) - the *select* half of validation - is kept;
    `patience` stops early after that many epochs without improvement.
    `standardize`: features are standardised by a scaler fit on the training originals (copy 0; every
    row when there are no copies), the same for every epoch; it is folded into the exported ONNX
    (the first Dense layer's weights), so the head still takes raw features.
    `fit(..., X_curve, y_curve)` logs loss and accuracy on another split each epoch (`report_*` in the
    history): learning curves only, never used to select or stop.
    """

    def __init__(self, units: int = BOOK_UNITS, dropout: float = BOOK_DROPOUT, epochs: int = BOOK_EPOCHS,
                 batch_size: int = BOOK_BATCH_SIZE, learning_rate: float = BOOK_LEARNING_RATE,
                 patience: int | None = None, schedule: str = "pool", steps_per_epoch: int | None = None,
                 seed: int = 0, progress: bool = False, standardize: bool = False):
        set_params(self, locals())

    def _fit_scaler(self, X, copy) -> None:
        """mean_/scale_ of the training originals (float64 statistics, float32 applied); scale 1 where a
        feature is constant, as StandardScaler does."""
        from sklearn.preprocessing import StandardScaler

        rows = np.flatnonzero(np.asarray(copy) == 0) if copy is not None and (np.asarray(copy) == 0).any() else None
        scaler = StandardScaler()
        block = 4096
        idx = np.arange(len(X)) if rows is None else rows
        for b in range(0, len(idx), block):
            scaler.partial_fit(np.asarray(X[idx[b : b + block]], np.float64))
        self.scaler_mean_ = scaler.mean_.astype(np.float32)
        self.scaler_scale_ = scaler.scale_.astype(np.float32)

    def _scaled(self, X) -> np.ndarray:
        X = np.asarray(X, np.float32)
        if not self.standardize:
            return X
        return (X - self.scaler_mean_) / self.scaler_scale_

    def _build(self, keras, n_features: int, n_classes: int):
        keras.utils.set_random_seed(self.seed)
        inputs = keras.Input((n_features,), name="features")
        head = dense_head_layers(keras, n_classes, self.units, self.dropout, self.seed)
        model = keras.Model(inputs, head(inputs))
        head.set_weights(initial_head_weights(n_features, self.units, n_classes, self.seed))
        compile_head_model(keras, model, n_classes, self.learning_rate)
        return model

    def fit(self, X, y, X_val=None, y_val=None, image=None, copy=None, X_curve=None, y_curve=None) -> DenseHead:
        from convcache.tfquiet import import_keras

        if self.schedule not in SCHEDULES:
            raise ConvcacheError(f"unknown schedule {self.schedule!r}; choose {', '.join(SCHEDULES)}")
        from sklearn.utils.multiclass import check_classification_targets
        from sklearn.utils.validation import check_X_y

        _, keras = import_keras()
        X, y = check_X_y(X, y, dtype=np.float32)  # finite, 2-d, dense, as many labels as rows
        check_classification_targets(y)
        self.classes_, y = np.unique(y, return_inverse=True)  # any labels; the network sees 0..n-1
        if len(self.classes_) < 2:
            raise ValueError(f"DenseHead needs at least 2 classes; y has {len(self.classes_)} class")
        if y_val is not None:
            y_val = np.searchsorted(self.classes_, np.asarray(y_val))
        if y_curve is not None:
            y_curve = np.searchsorted(self.classes_, np.asarray(y_curve))
        self.n_features_in_ = X.shape[1]
        n = len(self.classes_)
        image = np.arange(len(y)) if image is None else np.asarray(image)
        copy = np.zeros(len(y), np.int64) if copy is None else np.asarray(copy)
        if X_val is None:  # scikit-learn's fit(X, y): hold out a stratified 10% of the images to select on
            X, y, X_val, y_val, image, copy = _hold_out_images(X, y, image, copy, self.seed)
        plan = _Schedule(self.schedule, image, copy, self.batch_size, self.steps_per_epoch, self.seed)
        start = time.perf_counter()
        if self.standardize:
            self._fit_scaler(X, copy)
        self.model_ = self._build(keras, X.shape[1], n)
        X_val = self._scaled(X_val)
        X_curve = None if X_curve is None else self._scaled(X_curve)

        def evaluate():
            return {"select": evaluate_model(self.model_, X_val, y_val),
                    "report": None if X_curve is None else evaluate_model(self.model_, X_curve, y_curve)}

        history, selector = fit_epochs(self.model_, self.epochs,
                                       lambda e: batches_of(lambda idx: self._scaled(X[idx]), y, plan.rows(e),
                                                            self.batch_size),
                                       evaluate, self.patience, self.progress, f"dense ({self.schedule})",
                                       plan.info)
        return self._finish_fit(history, selector, start)

    def _finish_fit(self, history, selector, start) -> DenseHead:
        self.fit_seconds_ = time.perf_counter() - start
        self.history_ = history
        self.epochs_run_ = len(history)
        self.best_epoch_ = selector.best_epoch
        self.best_select_loss_ = selector.best_loss
        self.steps_run_ = int(sum(h["steps"] for h in history))
        self.copies_used_ = sorted({int(c) for h in history for c in h.get("copies", [])})
        self.seconds_per_epoch_ = self.fit_seconds_ / max(self.epochs_run_, 1)
        return self

    def fit_stream(self, blocks, classes, X_val, y_val) -> DenseHead:
        """Train from `blocks(epoch)`, an iterator of (X, y) blocks (shuffled by the caller), cut into
        batches of `batch_size`: the pool schedule over a store that is never loaded whole. Replay
        needs every image's copy e at epoch e, i.e. random access across the store, so it is refused."""
        from convcache.tfquiet import import_keras

        if self.schedule != "pool":
            raise ConvcacheError("streaming trains the dense head with --schedule pool (replay needs random access "
                                 "to every image's copies)")
        if self.standardize:
            raise ConvcacheError("the streamed dense head does not standardise its features; load them (a larger "
                                 "memory budget) or train without standardisation")
        _, keras = import_keras()
        self.classes_ = np.asarray(classes)
        X_val = np.asarray(X_val, np.float32)
        self.n_features_in_ = X_val.shape[1]
        self.model_ = self._build(keras, self.n_features_in_, len(self.classes_))

        def batches(epoch):
            for X, y in blocks(epoch):
                X = np.asarray(X, np.float32)
                for b in range(0, len(y), self.batch_size):
                    yield X[b : b + self.batch_size], y[b : b + self.batch_size]

        start = time.perf_counter()
        history, selector = fit_epochs(self.model_, self.epochs, batches,
                                       lambda: {"select": evaluate_model(self.model_, X_val, y_val)}, self.patience,
                                       self.progress, "dense (streaming)")
        return self._finish_fit(history, selector, start)

    def predict_proba(self, X) -> np.ndarray:
        from sklearn.utils.validation import check_array

        check_is_fitted(self, "model_")
        X = check_array(X, dtype=np.float32)
        if X.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {X.shape[1]} features, but DenseHead is expecting {self.n_features_in_} "
                             "features as input")
        return self._proba(X)

    def _proba(self, X) -> np.ndarray:
        """The network's class probabilities of already validated rows."""
        p = np.asarray(self.model_.predict(self._scaled(X), batch_size=256, verbose=0))
        return np.concatenate([1 - p, p], 1) if p.shape[1] == 1 else p

    def predict(self, X) -> np.ndarray:
        proba = self.predict_proba(X)  # checks that the head is fitted first
        return self.classes_[proba.argmax(1)]

    def summary(self) -> dict:
        return {"schedule": self.schedule, "epochs_run": self.epochs_run_, "best_epoch": self.best_epoch_,
                "steps": self.steps_run_, "batch_size": self.batch_size, "learning_rate": self.learning_rate,
                "copies_used": self.copies_used_, "seconds_per_epoch": self.seconds_per_epoch_,
                "standardize": self.standardize, "best_select_loss": self.best_select_loss_,
                **({"learning_rate_search": self.learning_rate_search_} if hasattr(self, "learning_rate_search_")
                   else {}),
                "rule": "lowest select-half loss" + (f", patience {self.patience}" if self.patience else ""),
                "history": self.history_}

    def to_onnx(self, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
        """features -> probabilities, written from the trained weights (`convcache.artifacts.convert.dense_to_onnx`)."""
        check_is_fitted(self, "model_")
        kernel, bias, w2, b2 = (np.asarray(w, np.float64) for w in self.model_.get_weights())
        if self.standardize:  # fold (x - mean) / scale into the first Dense layer: the head takes raw features
            kernel = kernel / self.scaler_scale_.astype(np.float64)[:, None]
            bias = bias - self.scaler_mean_.astype(np.float64) @ kernel
        return dense_to_onnx((kernel, bias), (w2, b2), FEATURES, PROBABILITIES, opset)


def dense_head_layers(keras, n_classes: int, units: int = BOOK_UNITS, dropout: float = BOOK_DROPOUT,
                      seed: int = 0):
    """The dense head as a Sequential, shared by DenseHead and the end-to-end reference. The dropout
    layer's generator is seeded, so both trainers draw the same masks step by step."""
    return keras.Sequential([
        keras.layers.Dense(units, activation="relu"),
        keras.layers.Dropout(dropout, seed=seed),
        keras.layers.Dense(1, activation="sigmoid") if n_classes == 2 else keras.layers.Dense(n_classes,
                                                                                             activation="softmax"),
    ], name="head")


HEADS = {"logreg": LogRegHead, "dense": DenseHead, "logreg-stream": StreamingLogRegHead}
