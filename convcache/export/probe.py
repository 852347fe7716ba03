"""What int8 or fp16 costs the task, not just the features: a linear probe on fp32 vs int8 (fp16) features.

Labelled images (class folders, or a split/class tree: every split is used) are decoded as extract
decodes them, run through both graphs (int8 on ONNX Runtime's CPU provider, as it is served; fp16 on the
CUDA provider where there is one, the device it is for, else on the CPU, where ONNX Runtime keeps the fp16
weights and the fp16 rounding between layers but computes each layer in fp32: the provider used is
reported), and a logistic-regression probe
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


def features(proto: onnx.ModelProto, images: np.ndarray, device: str = "cpu") -> np.ndarray:
    """The graph's features of `images`, in batches, on `device` (cpu, or cuda: see `probe_device`)."""
    if device == "cpu":
        from convcache.artifacts.convert import session

        s = session(proto)
    else:
        from convcache.runtime import create_session

        s = create_session(proto.SerializeToString(), device)
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: images[i : i + BATCH]})[0].reshape(len(images[i : i + BATCH]), -1)
                           for i in range(0, len(images), BATCH)])


def probe_device(precision: str) -> str:
    """Where a precision's features are probed: fp16 on CUDA when ONNX Runtime has it (fp16 is a GPU
    precision: its arithmetic there is what the user gets), everything else on the CPU."""
    import onnxruntime as ort

    return "cuda" if precision == "fp16" and "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"


def probe_accuracy(fp32: np.ndarray, int8: np.ndarray, labels: np.ndarray, seed: int = 0,
                   folds: int = 5, name: str = "int8") -> dict:
    """Paired cross-validated probe accuracy on the two feature sets (`int8`: the features of the precision
    called `name`, int8 or fp16)."""
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    per_class = np.bincount(labels).min() if len(labels) else 0
    folds = min(folds, int(per_class))
    if folds < 2 or per_class < 6:
        raise ConvcacheError(f"probe: need at least 6 readable images per class (have {per_class})")
    outer = StratifiedKFold(folds, shuffle=True, random_state=seed)
    correct = {}
    for arm, X in (("fp32", fp32), (name, int8)):
        correct[arm] = cross_val_predict(logreg_search(3, max_iter=500), X, labels, cv=outer) == labels
    d = correct[name].astype(float) - correct["fp32"]
    n = len(labels)
    test = mcnemar_exact(correct["fp32"], correct[name])
    only_fp32, only_other, p = test["only_a"], test["only_b"], test["p"]
    return {"images": n, "classes": int(labels.max()) + 1, "folds": folds, "seed": seed, "precision": name,
            "accuracy_fp32": float(correct["fp32"].mean()), f"accuracy_{name}": float(correct[name].mean()),
            "difference": float(d.mean()), "difference_se": float(d.std(ddof=1) / np.sqrt(n)),
            "discordant": {"fp32_only": only_fp32, f"{name}_only": only_other}, "mcnemar_p": float(p),
            "method": f"standardised logistic regression, C in {list(LOGREG_CS)} by inner 3-fold search, "
                      f"{folds}-fold stratified outer CV (same folds for both), paired over images"}


def probe_report(fp32: onnx.ModelProto, int8: onnx.ModelProto, folder: str, size: int, limit: int = 1000,
                 seed: int = 0, precision: str = "int8") -> dict:
    """The probe of `int8` (a graph of `precision`, int8 or fp16) against `fp32` on labelled images; fp32 runs
    on the CPU, the other on `probe_device(precision)`, named in the report with the cosine of the two."""
    from convcache.export.quantize import cosines

    device = probe_device(precision)
    images, labels, classes = labelled_images(folder, size, limit)
    a, b = features(fp32, images), features(int8, images, device)
    rep = probe_accuracy(a, b, labels, seed, name=precision)
    cos = cosines(a, b)
    return {"data": str(folder), "class_names": classes, "device": device,
            "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()), **rep}
