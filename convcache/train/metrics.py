"""The metrics every method reports, in one format."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, log_loss, roc_auc_score


def evaluate(proba: np.ndarray, y: np.ndarray, n_classes: int) -> dict:
    labels = list(range(n_classes))
    out = {
        "rows": int(len(y)),
        "accuracy": float(accuracy_score(y, proba.argmax(1))),
        "log_loss": float(log_loss(y, np.clip(proba, 1e-7, 1), labels=labels)),
        "confusion_matrix": confusion_matrix(y, proba.argmax(1), labels=labels).tolist(),
    }
    if n_classes == 2 and len(np.unique(y)) == 2:
        out["roc_auc"] = float(roc_auc_score(y, proba[:, 1]))
    return out


def write_metrics(path: str | Path, metrics: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
