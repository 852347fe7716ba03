"""The two halves of an augmented copy, per copy, on this machine: the Python half (parameters from the
generator keyed by seed, photo and copy, and the 3x3 map: `augment.copy_matrix`, under the GIL) and OpenCV's
warp (`augment.warp`, GIL released); then whole copies in a pool of 1 and 2 threads with OpenCV's own thread
pool at its default and at 1 thread (what extract sets while it warps): copies/s and CPU µs per copy.

    .venv/bin/python experiments/bench_warp.py --data ../shared/data/cats_and_dogs_small --images 64
"""

from __future__ import annotations

import argparse
import glob
import resource
import time
from concurrent.futures import ThreadPoolExecutor


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/cats_and_dogs_small")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--copies", type=int, default=15)
    p.add_argument("--size", type=int, default=150)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    import cv2

    from convcache.augment import AugmentPolicy, augment, copy_matrix, warp
    from convcache.imaging import read_and_decode
    from convcache.runtime import cpu_model

    paths = sorted(glob.glob(f"{a.data}/train/*/*.jpg"))[:: 1][: a.images]
    images = [read_and_decode(path, a.size) for path in paths]
    import hashlib

    jobs = [(px, hashlib.sha256(raw).hexdigest(), c) for raw, px in images for c in range(1, a.copies + 1)]
    policy, default_threads = AugmentPolicy(), cv2.getNumThreads()
    print(f"{len(jobs)} copies of {len(images)} photos at {a.size} px, {cpu_model()}, OpenCV {cv2.__version__} "
          f"(default {default_threads} threads), median of {a.repeats}\n")
    halves = {"map": [], "warp": []}
    for _ in range(a.repeats):
        t = time.perf_counter()
        maps = [(px, copy_matrix(policy, 0, sha, c, a.size, a.size)) for px, sha, c in jobs]
        halves["map"].append(1e6 * (time.perf_counter() - t) / len(jobs))
        t = time.perf_counter()
        for px, m in maps:
            warp(px, m, policy)
        halves["warp"].append(1e6 * (time.perf_counter() - t) / len(jobs))
    med = {k: sorted(v)[len(v) // 2] for k, v in halves.items()}
    print(f"| half of a copy, one thread | µs per copy |\n|---|---|\n| the map (Python, GIL held) | {med['map']:.0f} |"
          f"\n| OpenCV's warp (GIL released) | {med['warp']:.0f} |\n")
    print("| OpenCV threads | pool threads | copies/s | CPU µs per copy |\n|---|---|---|---|")
    for cv_threads in (default_threads, 1):
        cv2.setNumThreads(cv_threads)
        for workers in (1, 2):
            rates, cpus = [], []
            with ThreadPoolExecutor(workers) as ex:
                list(ex.map(lambda j: augment(j[0], policy, 0, j[1], j[2]), jobs[:50]))
                for _ in range(a.repeats):
                    c0, t = cpu(), time.perf_counter()
                    list(ex.map(lambda j: augment(j[0], policy, 0, j[1], j[2]), jobs))
                    rates.append(len(jobs) / (time.perf_counter() - t))
                    cpus.append(1e6 * (cpu() - c0) / len(jobs))
            print(f"| {cv_threads} | {workers} | {sorted(rates)[len(rates) // 2]:,.0f} | "
                  f"{sorted(cpus)[len(cpus) // 2]:.0f} |")
    cv2.setNumThreads(default_threads)


if __name__ == "__main__":
    main()
