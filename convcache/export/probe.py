"""What int8 costs the task, not just the features: a linear probe on fp32 vs int8 features.

Labelled images (class folders, or a split/class tree: every split is used) are decoded as extract
decodes them, run through both graphs on ONNX Runtime's CPU provider, and a logistic-regression probe
(standardised features, C chosen by an inner 3-fold search, the project's logreg grid) is scored by
the same outer stratified folds on each. Every image is predicted once per precision by a probe that
never saw it, so the two accuracies are paired: the report gives the difference (int8 - fp32), its
standard error over images, and McNemar's exact test on the discordant images.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx

from convcache.errors import ConvcacheError, ImageError
from convcache.protocol import LOGREG_CS, logreg_search
from convcache.stats import mcnemar_exact

log = logging.getLogger(__name__)

BATCH = 32


def labelled_images(folder: str, size: int, limit: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Up to `limit` decoded images (every class kept in proportion: an even stride over the sorted
    list), their labels and the class names. Unreadable files are skipped with a warning."""
    from convcache.datasets import discover
    from convcache.imaging import read_and_decode

    items, classes = discover(folder)
    if len(classes) < 2:
        raise ConvcacheError(f"--probe {folder}: needs images in at least 2 class folders")
    items = sorted(items, key=lambda it: it.path)
    items = items[:: max(1, -(-len(items) // limit))][:limit]
    images, labels = [], []
    for it in items:
        try:
            images.append(read_and_decode(it.path, size)[1])
            labels.append(it.label)
        except ImageError as exc:
            log.warning("probe: skipping %s (%s)", it.path, exc.reason)
    if not images:
        raise ConvcacheError(f"--probe {folder}: no readable images")
    return np.stack(images).astype(np.float32), np.asarray(labels), classes


def features(proto: onnx.ModelProto, images: np.ndarray) -> np.ndarray:
    from convcache.artifacts.convert import session

    s = session(proto)
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: images[i : i + BATCH]})[0].reshape(len(images[i : i + BATCH]), -1)
                           for i in range(0, len(images), BATCH)])


def probe_accuracy(fp32: np.ndarray, int8: np.ndarray, labels: np.ndarray, seed: int = 0,
                   folds: int = 5) -> dict:
    """Paired cross-validated probe accuracy on the two feature sets."""
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    per_class = np.bincount(labels).min() if len(labels) else 0
    folds = min(folds, int(per_class))
    if folds < 2 or per_class < 6:
        raise ConvcacheError(f"probe: need at least 6 readable images per class (have {per_class})")
    outer = StratifiedKFold(folds, shuffle=True, random_state=seed)
    correct = {}
    for name, X in (("fp32", fp32), ("int8", int8)):
        correct[name] = cross_val_predict(logreg_search(3, max_iter=500), X, labels, cv=outer) == labels
    d = correct["int8"].astype(float) - correct["fp32"]
    n = len(labels)
    test = mcnemar_exact(correct["fp32"], correct["int8"])
    only_fp32, only_int8, p = test["only_a"], test["only_b"], test["p"]
    return {"images": n, "classes": int(labels.max()) + 1, "folds": folds, "seed": seed,
            "accuracy_fp32": float(correct["fp32"].mean()), "accuracy_int8": float(correct["int8"].mean()),
            "difference": float(d.mean()), "difference_se": float(d.std(ddof=1) / np.sqrt(n)),
            "discordant": {"fp32_only": only_fp32, "int8_only": only_int8}, "mcnemar_p": float(p),
            "method": f"standardised logistic regression, C in {list(LOGREG_CS)} by inner 3-fold search, "
                      f"{folds}-fold stratified outer CV (same folds for both), paired over images"}


def probe_report(fp32: onnx.ModelProto, int8: onnx.ModelProto, folder: str, size: int, limit: int = 1000,
                 seed: int = 0) -> dict:
    images, labels, classes = labelled_images(folder, size, limit)
    rep = probe_accuracy(features(fp32, images), features(int8, images), labels, seed)
    return {"data": str(folder), "class_names": classes, **rep}
