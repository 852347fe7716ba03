"""Fault injection on extract, longer than the test suite allows (not in `make test`):

- N random `kill -9` points during an extract, each resumed to completion and compared bitwise with
  an uninterrupted run (features, labels, image ids, copies, hashes, paths) and verified (block digests);
- two concurrent writers on one store: the second must fail at once, the first finish, nothing lost;
- disk full on a small tmpfs (where mounting one is allowed): one line, committed rows intact.

    .venv/bin/python bench/stress_faults.py --kills 20
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import make_dataset

from convcache.export.runner import export_extractor
from convcache.store import FeatureStore


def arrays(path):
    store = FeatureStore(path)
    return {s: (lambda d: (d.features, d.labels, d.image, d.copy, d.sha256, d.paths))(store.load(s))
            for s in store.splits}


def same(a, b) -> bool:
    A, B = arrays(a), arrays(b)
    return A.keys() == B.keys() and all(np.array_equal(np.asarray(x), np.asarray(y))
                                        for s in A for x, y in zip(A[s], B[s]))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--images", type=int, default=30, help="per class in train")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    rng = random.Random(a.seed)
    tmp = Path(tempfile.mkdtemp(prefix="convcache-faults-"))
    model = tmp / "e.onnx"
    export_extractor("random", 32, str(model), seed=1)
    data = make_dataset(tmp / "d", splits={"train": a.images, "validation": 5})
    cmd = [sys.executable, "-m", "convcache", "extract", "--model", str(model), "--data", str(data), "--augment", "3",
           "--batch-size", "2", "--chunk-rows", "4", "--quiet", "-o"]
    t0 = time.perf_counter()
    subprocess.run([*cmd, str(tmp / "clean.zarr")], check=True, capture_output=True)
    clean_s = time.perf_counter() - t0
    print(f"clean run: {clean_s:.1f}s; {FeatureStore(tmp / 'clean.zarr').rows('train')} train rows")

    ok = 0
    for k in range(a.kills):
        store = tmp / f"k{k}.zarr"
        at = rng.uniform(0.3, 0.85) * clean_s  # start-up included: early kills land before any row is committed
        proc = subprocess.Popen([*cmd, str(store)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(at)
        killed = proc.poll() is None
        proc.kill()
        proc.wait()
        rows = json.loads((store / "train" / "zarr.json").read_text())["attributes"]["committed_rows"] \
            if (store / "train" / "zarr.json").exists() else 0
        r = subprocess.run([*cmd, str(store)], capture_output=True, text=True)
        good = r.returncode == 0 and same(store, tmp / "clean.zarr") and all(
            not FeatureStore(store).verify(s)[0] for s in FeatureStore(store).splits)
        ok += good
        print(f"kill {k + 1:2d} at {at:5.2f}s ({'mid-run' if killed else 'after the end'}, {rows} rows committed): "
              f"{'bitwise equal after resume' if good else 'MISMATCH: ' + r.stderr[-200:]}")
        shutil.rmtree(store)
    print(f"\n{ok} of {a.kills} kill -9 points resumed to a store bitwise equal to the clean run")

    store = tmp / "two.zarr"
    first = subprocess.Popen([*cmd, str(store)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(min(2.0, clean_s / 3))
    second = subprocess.run([*cmd, str(store)], capture_output=True, text=True)
    print(f"two writers: second exit {second.returncode} ({second.stderr.strip()[:90]}...), first exit "
          f"{first.wait()}, store equal to clean: {same(store, tmp / 'clean.zarr')}")

    small = tmp / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(small)], capture_output=True).returncode:
        print("disk full: skipped (cannot mount a tmpfs here)")
    else:
        try:
            r = subprocess.run([*cmd, str(small / "f.zarr")], capture_output=True, text=True)
            fs = FeatureStore(small / "f.zarr")
            print(f"disk full: exit {r.returncode}, {len(r.stderr.strip().splitlines())} line: "
                  f"{r.stderr.strip()[:120]}; {fs.rows('train')} rows committed, intact: {not fs.verify('train')[0]}")
        finally:
            subprocess.run(["umount", str(small)], capture_output=True)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
