"""The costs the study's compute ratios rest on, measured back to back in one run on a quiet CPU:
extracting one cached row (decode + augment + ONNX Runtime), one end-to-end method-2 image (decode
once, augment + TensorFlow forward through the frozen base + head update; validation forward), and one
epoch of the dense head on cached features (2,000 rows in batches of 20, plus the select-half evaluation).

    .venv/bin/python experiments/bench_method2_cost.py --images 160 --extractor runs/study/block5.onnx [--json OUT]
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path

from convcache.artifacts import read
from convcache.augment import PRESETS
from convcache.extract.runner import ExtractConfig, run_extract
from convcache.runtime import cpu_model
from convcache.train.reference import ReferenceConfig, run_reference


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="../shared/data/cats_and_dogs_small")
    p.add_argument("--extractor", default="runs/study/block5.onnx")
    p.add_argument("--images", type=int, default=160, help="training images (half per class); validation gets half")
    p.add_argument("--json", help="also write the result here")
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="m2cost-"))
    manifest = tmp / "m.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        for split, n in (("train", a.images), ("validation", a.images // 2)):
            for cls in ("cats", "dogs"):
                files = sorted((Path(a.data) / split / cls).glob("*.jpg"))[: n // 2]
                w.writerows([str(x.resolve()), cls, split] for x in files)
    t = time.perf_counter()
    s = run_extract(ExtractConfig(model=a.extractor, data=str(manifest), output=str(tmp / "f.zarr"), augment=1,
                                  policy=PRESETS["book"], progress=False))
    extract_s = time.perf_counter() - t
    ext = read(a.extractor)  # the same cut and pooling end to end
    # two epochs, the second one timed: the first pays for tracing and XLA-compiling the model
    m = run_reference(ReferenceConfig(data=str(manifest), weights="hed", output=str(tmp / "ref"), epochs=2,
                                      policy=PRESETS["book"], progress=False, batch_size=20, layer=ext.layer,
                                      pooling=ext.pooling, input_size=ext.size, preprocess=ext.preprocess))
    head_epoch = _head_epoch_seconds(ext.n_features)
    h = m["history"][1]
    out = {"cpu": cpu_model(), "extract_rows": s.rows_written, "extract_seconds": extract_s,
           "extract_ms_per_row": 1000 * extract_s / s.rows_written,
           "e2e_train_ms_per_image": 1000 * h["train_seconds"] / a.images,
           "e2e_eval_ms_per_image": 1000 * h["eval_seconds"] / (a.images // 2)}
    out["method2_epoch_seconds_2000_train_1000_val"] = (2000 * out["e2e_train_ms_per_image"]
                                                       + 1000 * out["e2e_eval_ms_per_image"]) / 1000
    out.update({"head_epoch_s": head_epoch, "extract_s_per_row": out["extract_ms_per_row"] / 1000,
                "e2e_train_s_per_image": out["e2e_train_ms_per_image"] / 1000,
                "e2e_eval_s_per_image": out["e2e_eval_ms_per_image"] / 1000, "extractor": str(a.extractor)})
    print(json.dumps(out, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")


def _head_epoch_seconds(n_features: int, epochs: int = 4) -> float:
    """Median seconds of one dense-head epoch on cached features: 2,000 rows, batch 20, select-half evaluation."""
    import numpy as np

    from convcache.train.heads import DenseHead

    rng = np.random.default_rng(0)
    X = rng.normal(0, 1, (2000, n_features)).astype(np.float32)
    y = np.arange(2000) % 2
    head = DenseHead(epochs=epochs, learning_rate=2e-5, schedule="replay", standardize=True)
    head.fit(X, y, X[:500], y[:500])
    return float(np.median([h["train_seconds"] + h["eval_seconds"] for h in head.history_[1:]]))


if __name__ == "__main__":
    main()
