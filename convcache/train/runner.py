"""train: fit a head on cached features, export it to ONNX, verify it, and write metrics.json."""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from convcache.errors import ConvcacheError
from convcache.onnxmeta import graph_sha256, set_metadata
from convcache.train.data import load_training_data
from convcache.train.heads import HEADS
from convcache.train.metrics import evaluate, write_metrics

log = logging.getLogger(__name__)


def train_head(store: str, head: str, out_dir: str, copies: int | None = None, params: dict | None = None) -> dict:
    if head not in HEADS:
        raise ConvcacheError(f"unknown head {head!r}; choose {', '.join(HEADS)}")
    load_start = time.perf_counter()
    data = load_training_data(store, copies)
    load_seconds = time.perf_counter() - load_start
    val = data.validation
    if val is None and head == "dense":
        raise ConvcacheError("the dense head early-stops on the validation split, and the store has none")
    estimator = HEADS[head](**(params or {}))
    estimator.fit(data.train.X, data.train.y, val.X if val else None, val.y if val else None)

    n = len(data.classes)
    metrics = {
        "method": "cached", "head": head, "copies": copies if copies is not None else "all",
        "classes": data.classes, "fit_seconds": estimator.fit_seconds_, "load_seconds": load_seconds,
        "rows": {"train": int(len(data.train.y))}, "selection": estimator.summary(),
        "provenance": data.provenance, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    for name, split in (("validation", val), ("test", data.test)):
        if split is not None:
            metrics[name] = evaluate(estimator.predict_proba(split.X), split.y, n)
            metrics["rows"][name] = int(len(split.y))

    proto = estimator.to_onnx()
    set_metadata(proto, {"kind": "head", "head": head, "classes": data.classes, "n_features": int(data.train.X.shape[1]),
                         "feature_shape": data.feature_shape, "extractor_sha256": data.extractor_sha256,
                         "provenance": data.provenance, "graph_sha256": graph_sha256(proto)})
    onnx.checker.check_model(proto, full_check=True)
    check = val.X[:64] if val is not None else data.train.X[:64]
    metrics["onnx_max_abs_diff"] = _parity(proto, estimator, check)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(out / "head.onnx"))
    metrics["head_onnx"] = str(out / "head.onnx")
    write_metrics(out / "metrics.json", metrics)
    return metrics


def _parity(proto, estimator, X) -> float:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(["probabilities"], {"features": X})[0]
    diff = float(np.max(np.abs(got - estimator.predict_proba(X))))
    if diff > 1e-4:
        raise ConvcacheError(f"the ONNX head differs from the fitted head by {diff:.3g}")
    return diff
