"""The per-row costs behind the input pipeline's changes of 2026-12-07 (docs/benchmarks.md, "The input pipeline,
measured against a stricter peer" and "Where the extracting process's CPU goes"), each against its peer in the
same run, on real photos:

  read     a 45 KB photo read with f.read(64 MiB + 1) (what read_bytes did: CPython allocates the 64 MiB first)
           against read_bytes as it is (stat's size + 1)
  hash     reading and hashing N files: in this thread, one pool future a file, 16 files a job (2 threads)
  copy     one row's uint8 copy into a batch buffer, alone and beside a thread running Python (the copy gives up
           the GIL and must win it back)
  warp     OpenCV's warp of a 150 px image: the same source every time, a different one each time, 1 and 2 threads

    python experiments/bench_pipeline_micro.py --data ../shared/data/cats_and_dogs_small --images 2000
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def per_item(fn, n: int, repeats: int) -> float:
    """Median µs per item of `repeats` calls of fn (which handles n items), after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e6 * statistics.median(times) / n


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/cats_and_dogs_small")
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args(argv)
    from convcache.augment import PRESETS, copy_matrix, warp, warp_threads
    from convcache.extract.engine import _chunks, _ordered
    from convcache.imaging import decode_image, read_bytes
    from convcache.runtime import cpu_model

    paths = sorted(str(x) for x in Path(a.data).rglob("*.jpg"))[: a.images]
    n, r = len(paths), a.repeats
    print(f"{n} photos ({sum(Path(x).stat().st_size for x in paths) / n / 1e3:.0f} KB on average), {r} repeats, "
          f"medians, {cpu_model()}\n")
    print("| what | µs per item |\n|---|---|")

    def old_read(path):
        with open(path, "rb") as f:
            return f.read((64 << 20) + 1)

    def each(fn):  # nothing kept: 2,000 photos held at once would add their page faults
        for x in paths:
            fn(x)

    print(f"| read: f.read(64 MiB + 1) | {per_item(lambda: each(old_read), n, r):.1f} |")
    print(f"| read: read_bytes (stat's size + 1) | {per_item(lambda: each(read_bytes), n, r):.1f} |")

    def hash_one(path):
        return hashlib.sha256(read_bytes(path)).hexdigest()

    def hash_some(chunk):
        return [hash_one(x) for x in chunk]

    with ThreadPoolExecutor(2) as pool:
        print(f"| hash: in this thread | {per_item(lambda: each(hash_one), n, r):.1f} |")
        one = per_item(lambda: list(_ordered(pool, hash_one, ((x,) for x in paths), 32)), n, r)
        print(f"| hash: one future a file, 2 threads | {one:.1f} |")
        some = per_item(lambda: list(_ordered(pool, hash_some, _chunks(paths, 16), 8)), n, r)
        print(f"| hash: 16 files a job, 2 threads | {some:.1f} |")

    batch = np.empty((256, 150, 150, 3), np.uint8)
    rows = [decode_image(read_bytes(x), 150) for x in paths[:256]]

    def fill():
        for i, px in enumerate(rows):
            batch[i] = px

    print(f"| copy a row into the batch, alone | {per_item(fill, len(rows), r):.1f} |")
    stop = threading.Event()

    def python():
        k = 0
        while not stop.is_set():
            k += 1

    spinner = threading.Thread(target=python)
    spinner.start()
    try:
        print(f"| copy a row into the batch, beside a thread running Python | {per_item(fill, len(rows), r):.1f} |")
    finally:
        stop.set()
        spinner.join()

    policy = PRESETS["keras3"]
    maps = [copy_matrix(policy, 0, "ab" * 32, c, 150, 150) for c in range(1, 65)]
    sources = [decode_image(read_bytes(x), 150) for x in paths[:1000]]
    before = warp_threads(1)

    def warps(threads: int, distinct: bool, count: int = 2000):
        def work(offset):
            for i in range(count):
                warp(sources[(offset + i) % len(sources)] if distinct else sources[0], maps[i % 64], policy)

        ts = [threading.Thread(target=work, args=(k * 500,)) for k in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    try:
        for threads in (1, 2):
            for distinct in (False, True):
                wall = per_item(lambda t=threads, d=distinct: warps(t, d), 2000 * threads, r)
                print(f"| warp, {'a different' if distinct else 'the same'} source each time, {threads} thread"
                      f"{'s' if threads > 1 else ''}: wall per warp (x threads = CPU per warp) | {wall:.1f} |")
    finally:
        warp_threads(before)


if __name__ == "__main__":
    main()
