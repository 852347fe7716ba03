"""The per-call figures behind stop 38's notes in docs/benchmarks.md, in one run (medians of --repeats, each a
loop of --calls; alternating arms):

- warp maps: `augment.copy_matrix` one copy at a time against one `augment.copy_matrices` call, at 1, 15 (one
  photo's copies) and 120 keys (a decoding task's 8 photos x 15), µs a copy;
- decoding: `imaging.decode_image` against the same decode with `ImageOps.exif_transpose` returning a copy (the
  code before), µs a photo, and whether the pixels are equal;
- zarr 3 metadata writes on a local store: create an array, resize, a one-row write, an attribute update, a
  consolidation, ms each.

    .venv/bin/python experiments/bench_stop38_micro.py --data ../shared/data/cats_and_dogs_small/train --photos 600
"""

from __future__ import annotations

import argparse
import hashlib
import io
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np


def timed(fn, calls: int) -> float:
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t) / calls


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/cats_and_dogs_small/train")
    p.add_argument("--photos", type=int, default=600)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args(argv)
    from PIL import Image, ImageOps

    from convcache.augment import AugmentPolicy, copy_matrices, copy_matrix
    from convcache.imaging import decode_image, prepare_image
    from convcache.runtime import cpu_model

    print(f"{cpu_model()}; medians of {a.repeats} repeats\n")
    policy = AugmentPolicy()
    shas = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(64)]
    print("| warp maps, keys a call | one at a time, µs a copy | together, µs a copy | ratio |\n|---|---|---|---|")
    for n in (1, 15, 120):
        keys = [(shas[i // 15], 1 + i % 15) for i in range(n)]
        one, many = [], []
        for _ in range(a.repeats):
            one.append(timed(lambda k=keys: [copy_matrix(policy, 0, s, c, 150, 150) for s, c in k], 100) / n)
            many.append(timed(lambda k=keys: copy_matrices(policy, 0, k, 150, 150), 100) / n)
        print(f"| {n} | {np.median(one) * 1e6:.1f} | {np.median(many) * 1e6:.1f} | "
              f"{np.median(one) / np.median(many):.1f}x |")

    paths = sorted(Path(a.data).rglob("*.jpg"))[: a.photos]
    datas = [f.read_bytes() for f in paths]

    def before(data, size=150):
        img = Image.open(io.BytesIO(data))
        img.draft("RGB", (size, size))
        img.load()
        return prepare_image(ImageOps.exif_transpose(img), size)

    same = all(np.array_equal(before(d), decode_image(d, 150)) for d in datas)
    old, new = [], []
    for r in range(a.repeats):
        arms = [(old, before), (new, lambda d: decode_image(d, 150))]
        for out, fn in arms if r % 2 else arms[::-1]:
            t = time.perf_counter()
            for d in datas:
                fn(d)
            out.append((time.perf_counter() - t) / len(datas))
    print(f"\n| decode, {len(datas)} photos | µs a photo |\n|---|---|\n| exif_transpose copying (before) | "
          f"{np.median(old) * 1e6:.0f} |\n| in place (now) | {np.median(new) * 1e6:.0f} |\n"
          f"median per-repeat ratio before/now {np.median(np.array(old) / np.array(new)):.3f}; pixels equal on all "
          f"{len(datas)}: {same}")

    import zarr

    g = zarr.open_group(tempfile.mkdtemp(), mode="w")
    made = iter(range(10**6))
    arr = g.create_array("a", shape=(0,), chunks=(65536,), dtype="int32")
    ops = {"create an array": lambda: g.create_array(f"b{next(made)}", shape=(0,), chunks=(65536,), dtype="int32"),
           "resize": lambda: arr.resize((arr.shape[0] + 1,)),
           "write one row": lambda: arr.__setitem__(slice(0, 1), np.array([1], "int32")),
           "update an attribute": lambda: g.update_attributes({"x": next(made)})}
    print(f"\n| zarr {zarr.__version__}, local store | ms |\n|---|---|")
    for name, fn in ops.items():
        print(f"| {name} | {np.median([timed(fn, 20) for _ in range(a.repeats)]) * 1e3:.2f} |")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        print(f"| consolidate ({len(list(g.keys()))} nodes) | "
              f"{np.median([timed(lambda: zarr.consolidate_metadata(g.store), 5) for _ in range(a.repeats)]) * 1e3:.2f} |")


if __name__ == "__main__":
    main()
