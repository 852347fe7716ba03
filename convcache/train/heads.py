"""Heads on cached features, following scikit-learn's conventions: __init__ stores parameters,
fit returns self, learned attributes end in '_'. Each exports itself to ONNX with one input,
`features` (batch, n_features), and one output, `probabilities` (batch, n_classes)."""

from __future__ import annotations

import logging
import time

import numpy as np
import onnx

from convcache.errors import ConvcacheError

log = logging.getLogger(__name__)

OPSET = 17  # the extractor's opset, so that fusion joins one opset


class LogRegHead:
    """Standardization + multinomial logistic regression; C chosen on validation accuracy only."""

    def __init__(self, Cs=(0.0003, 0.003, 0.03, 0.3), max_iter: int = 300, tol: float = 1e-4):
        self.Cs = Cs
        self.max_iter = max_iter
        self.tol = tol

    def fit(self, X, y, X_val=None, y_val=None) -> "LogRegHead":
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import Pipeline
        from sklearn.preprocessing import StandardScaler

        if len(self.Cs) > 1 and X_val is None:
            raise ConvcacheError("logreg selects C on the validation split, and the store has none "
                                 "(pass a single C, or extract a validation split)")
        start = time.perf_counter()
        scaler = StandardScaler().fit(X)
        Xs = scaler.transform(X).astype(np.float32)
        Xv = scaler.transform(X_val).astype(np.float32) if X_val is not None else None
        # Ascending C with warm starts: each fit starts from the previous, more regularised solution.
        model = LogisticRegression(C=self.Cs[0], max_iter=self.max_iter, tol=self.tol, warm_start=True)
        best, self.scores_ = None, {}
        for C in sorted(self.Cs):
            model.set_params(C=C)
            model.fit(Xs, y)
            score = float(model.score(Xv, y_val)) if Xv is not None else 0.0
            self.scores_[C] = score
            if best is None or score > best[0]:
                best = (score, C, model.coef_.copy(), model.intercept_.copy())
        model.set_params(C=best[1])
        model.coef_, model.intercept_ = best[2], best[3]
        self.C_ = best[1]
        self.pipeline_ = Pipeline([("scale", scaler), ("logreg", model)])
        self.classes_ = model.classes_
        self.n_features_in_ = X.shape[1]
        self.fit_seconds_ = time.perf_counter() - start
        return self

    def predict_proba(self, X) -> np.ndarray:
        return self.pipeline_.predict_proba(X)

    def predict(self, X) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(1)]

    def summary(self) -> dict:
        return {"C": self.C_, "validation_accuracy_by_C": {str(k): v for k, v in self.scores_.items()}}

    def to_onnx(self) -> onnx.ModelProto:
        from skl2onnx import convert_sklearn
        from skl2onnx.common.data_types import FloatTensorType

        proto = convert_sklearn(self.pipeline_, initial_types=[("features", FloatTensorType([None, self.n_features_in_]))],
                                options={id(self.pipeline_.steps[-1][1]): {"zipmap": False}}, target_opset=OPSET)
        return _keep_only_output(proto, "probabilities")


class DenseHead:
    """Chollet's head: Dense(units, relu) -> Dropout -> sigmoid (2 classes) or softmax. Early stopping
    on validation loss, restoring the best epoch."""

    def __init__(self, units: int = 256, dropout: float = 0.5, epochs: int = 30, batch_size: int = 32,
                 learning_rate: float = 2e-5, patience: int = 5, seed: int = 0):
        self.units = units
        self.dropout = dropout
        self.epochs = epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.patience = patience
        self.seed = seed

    def fit(self, X, y, X_val=None, y_val=None) -> "DenseHead":
        from convcache.tfquiet import import_keras

        _, keras = import_keras()
        keras.utils.set_random_seed(self.seed)
        self.classes_ = np.unique(y)
        self.n_features_in_ = X.shape[1]
        n = len(self.classes_)
        inputs = keras.Input((X.shape[1],), name="features")
        outputs = dense_head_layers(keras, n, self.units, self.dropout)(inputs)
        self.model_ = keras.Model(inputs, outputs)
        self.model_.compile(optimizer=keras.optimizers.RMSprop(self.learning_rate),
                            loss="binary_crossentropy" if n == 2 else "sparse_categorical_crossentropy",
                            metrics=["accuracy"])
        callbacks, val = [], None
        if X_val is not None:
            val = (X_val, y_val)
            callbacks.append(keras.callbacks.EarlyStopping("val_loss", patience=self.patience,
                                                           restore_best_weights=True))
        start = time.perf_counter()
        history = self.model_.fit(X, y, epochs=self.epochs, batch_size=self.batch_size, validation_data=val,
                                  callbacks=callbacks, verbose=0, shuffle=True)
        self.fit_seconds_ = time.perf_counter() - start
        self.history_ = {k: [float(v) for v in vs] for k, vs in history.history.items()}
        self.epochs_run_ = len(self.history_["loss"])
        self.seconds_per_epoch_ = self.fit_seconds_ / max(self.epochs_run_, 1)
        return self

    def predict_proba(self, X) -> np.ndarray:
        p = np.asarray(self.model_.predict(X, batch_size=256, verbose=0))
        return np.concatenate([1 - p, p], 1) if p.shape[1] == 1 else p

    def predict(self, X) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(1)]

    def summary(self) -> dict:
        best = int(np.argmin(self.history_["val_loss"])) + 1 if "val_loss" in self.history_ else self.epochs_run_
        return {"epochs_run": self.epochs_run_, "best_epoch": best, "seconds_per_epoch": self.seconds_per_epoch_,
                "history": self.history_}

    def to_onnx(self) -> onnx.ModelProto:
        from convcache.tfquiet import import_keras

        tf, keras = import_keras()
        import tf2onnx

        inputs = keras.Input((self.n_features_in_,), name="features")
        p = self.model_(inputs)
        if p.shape[-1] == 1:  # sigmoid -> two-column probabilities, like logreg's
            p = keras.layers.Concatenate()([keras.layers.Lambda(lambda t: 1.0 - t)(p), p])
        wrapped = keras.Model(inputs, p)
        spec = [tf.TensorSpec((None, self.n_features_in_), tf.float32, name="features")]
        proto, _ = tf2onnx.convert.from_keras(wrapped, input_signature=spec, opset=OPSET)
        _rename_output(proto, "probabilities")
        return proto


def dense_head_layers(keras, n_classes: int, units: int = 256, dropout: float = 0.5):
    """The dense head as a Sequential, shared by DenseHead and the end-to-end reference."""
    return keras.Sequential([
        keras.layers.Dense(units, activation="relu"),
        keras.layers.Dropout(dropout),
        keras.layers.Dense(1, activation="sigmoid") if n_classes == 2 else keras.layers.Dense(n_classes,
                                                                                             activation="softmax"),
    ], name="head")


def _rename_output(proto: onnx.ModelProto, name: str) -> None:
    old = proto.graph.output[0].name
    for node in proto.graph.node:
        node.output[:] = [name if o == old else o for o in node.output]
        node.input[:] = [name if i == old else i for i in node.input]
    proto.graph.output[0].name = name


def _keep_only_output(proto: onnx.ModelProto, name: str) -> onnx.ModelProto:
    keep = [o for o in proto.graph.output if o.name == name]
    del proto.graph.output[:]
    proto.graph.output.extend(keep)
    return proto


HEADS = {"logreg": LogRegHead, "dense": DenseHead}
