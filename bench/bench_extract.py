"""The whole extract pipeline (decode, augment, infer, write) against bare ORT inference on
pre-decoded arrays, in one run on the same images; and the store's size for float32 and float16.

    .venv/bin/python bench/bench_extract.py --data ../shared/data/cats_and_dogs_small --images 300 --augment 2
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from convcache.augment import AugmentPolicy, augment
from convcache.datasets import discover
from convcache.export.runner import export_extractor
from convcache.extract.runner import ExtractConfig, Extractor, run_extract
from convcache.imaging import read_and_decode


def subset(data: str, n: int, dst: Path) -> Path:
    """Symlinks to the first n/2 train images of each class (the original files are not copied)."""
    items, classes = discover(data)
    for label, name in enumerate(classes):
        picked = [i for i in items if i.split == "train" and i.label == label][: n // len(classes)]
        (dst / "train" / name).mkdir(parents=True)
        for item in picked:
            (dst / "train" / name / Path(item.path).name).symlink_to(Path(item.path).resolve())
    return dst


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="../shared/data/cats_and_dogs_small")
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--augment", type=int, default=2)
    p.add_argument("--weights", default="hed")
    p.add_argument("--size", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=32)
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp())
    data = subset(a.data, a.images, tmp / "data")
    model = tmp / "extractor.onnx"
    export_extractor(a.weights, a.size, str(model))

    # Bare: the same rows, decoded and augmented beforehand, straight through session.run.
    extractor = Extractor(str(model), "cpu")
    items, _ = discover(str(data))
    rows = []
    for item in items:
        raw, pixels = read_and_decode(item.path, a.size)
        import hashlib

        sha = hashlib.sha256(raw).hexdigest()
        rows += [augment(pixels, AugmentPolicy(), 0, sha, c) for c in range(a.augment + 1)]
    batch = np.stack(rows).astype(np.float32)
    extractor(batch[: a.batch_size])  # warm-up
    t = time.perf_counter()
    for i in range(0, len(batch), a.batch_size):
        extractor(batch[i : i + a.batch_size])
    bare = len(batch) / (time.perf_counter() - t)

    results = {}
    for dtype in ("float32", "float16"):
        store = tmp / f"{dtype}.zarr"
        s = run_extract(ExtractConfig(model=str(model), data=str(data), output=str(store), augment=a.augment,
                                      batch_size=a.batch_size, dtype=dtype, progress=False, device="cpu"))
        results[dtype] = (s.rows_written, s.rows_per_second, du(store))
    print(f"{len(batch)} rows ({len(items)} images x {a.augment + 1} copies) at {a.size}x{a.size}, "
          f"batch {a.batch_size}, {a.weights} weights\n")
    print("| what | rows/s | vs bare ORT | store size | bytes/row |")
    print("|---|---|---|---|---|")
    print(f"| bare ORT on pre-decoded arrays | {bare:.1f} | 1.00x | | |")
    for dtype, (n, rate, size) in results.items():
        print(f"| full pipeline, {dtype} store | {rate:.1f} | {rate / bare:.2f}x | {size / 2**20:.1f} MiB | "
              f"{size / n:,.0f} |")


if __name__ == "__main__":
    main()
