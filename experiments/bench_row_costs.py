"""Two per-row costs of the extract pipeline's Python, each a loop timed for about a second: the warp maps of a
call of `augment.copy_matrices` a copy, by how many (image, copy) keys one call computes (one image's 15 copies
against many images' at once: why the maps are computed ahead, `mapper.maps_of`), and making one row's record
as a frozen dataclass of `engine.Row`'s fields against `Row` itself, a named tuple (one is made a row).

    .venv/bin/python experiments/bench_row_costs.py
"""

from __future__ import annotations

import argparse
import hashlib
import time
from dataclasses import make_dataclass


def per_call(fn, n: int, seconds: float) -> float:
    """µs per item of `fn()` (which handles n items), over calls for about `seconds`."""
    fn()
    done, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        fn()
        done += n
    return 1e6 * (time.perf_counter() - t) / done


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=1.0)
    a = p.parse_args(argv)
    from convcache.augment import PRESETS, copy_matrices
    from convcache.extract.engine import Row
    from convcache.runtime import cpu_model

    FrozenRow = make_dataclass("FrozenRow", [(f, Row.__annotations__[f]) for f in Row._fields], frozen=True)

    policy = PRESETS["keras3"]
    shas = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(400)]
    print(f"{cpu_model()}\n\n| warp maps: keys a call | µs a copy |\n|---|---|")
    for n in (1, 15, 120, 960, 4800):
        keys = [(sha, c) for sha in shas for c in range(1, 16)][:n]
        print(f"| {n:,} | {per_call(lambda keys=keys: copy_matrices(policy, 0, keys, 150, 150), n, a.seconds):.1f} |")
    print("\n| a row's record | µs each |\n|---|---|")
    for name, kind in (("frozen dataclass (Row's fields, as before 77a0cee)", FrozenRow), ("named tuple (Row)", Row)):
        us = per_call(lambda kind=kind: [kind("a/b.jpg", 1, 2, 3, shas[0], "a/b.jpg") for _ in range(1000)], 1000,
                      a.seconds)
        print(f"| {name} | {us:.2f} |")


if __name__ == "__main__":
    main()
