"""Two per-row costs of the extract pipeline's Python, each a loop timed for about a second: the warp maps of a
call of `augment.copy_matrices` a copy, by how many (image, copy) keys one call computes (one image's 15 copies
against many images' at once: why the maps are computed ahead, `mapper.maps_of`), and making one row's record
as a frozen dataclass against a named tuple (`engine.Row`, one a row).

    .venv/bin/python experiments/bench_row_costs.py
"""

from __future__ import annotations

import argparse
import hashlib
import time
from dataclasses import dataclass
from typing import NamedTuple


@dataclass(frozen=True)
class FrozenRow:
    source: str
    label: int
    image: int
    copy: int
    sha256: str
    path: str


class TupleRow(NamedTuple):
    source: str
    label: int
    image: int
    copy: int
    sha256: str
    path: str


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
    from convcache.runtime import cpu_model

    policy = PRESETS["keras3"]
    shas = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(400)]
    print(f"{cpu_model()}\n\n| warp maps: keys a call | µs a copy |\n|---|---|")
    for n in (1, 15, 120, 960, 4800):
        keys = [(sha, c) for sha in shas for c in range(1, 16)][:n]
        print(f"| {n:,} | {per_call(lambda keys=keys: copy_matrices(policy, 0, keys, 150, 150), n, a.seconds):.1f} |")
    print("\n| a row's record | µs each |\n|---|---|")
    for kind in (FrozenRow, TupleRow):
        us = per_call(lambda kind=kind: [kind("a/b.jpg", 1, 2, 3, shas[0], "a/b.jpg") for _ in range(1000)], 1000, a.seconds)
        print(f"| {'frozen dataclass' if kind is FrozenRow else 'named tuple'} | {us:.2f} |")


if __name__ == "__main__":
    main()
