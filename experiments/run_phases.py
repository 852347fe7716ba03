"""Where a null-device extract's seconds go, phase by phase, and how many cores each phase keeps busy (its
process CPU over its wall time): the extractor's contract (loading and identifying the model), creating the
split, hashing the files, the stat cache, the listing, the rows (decode, warp, batches, writes, commits), and
every commit's attributes and snapshot (within the rows' phase too, and the run's last). Timers wrap those calls of the checkout this runs in (PYTHONPATH=.); each run is a warm one,
after a first in the same process.

    PYTHONPATH=. .venv/bin/python experiments/run_phases.py --model runs/ext.onnx \\
        --data ../shared/data/cats_and_dogs_small --images 2000 --augment 0 --runs 3
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from convcache.benchmarks.extract import subset_and_output, subset_arguments

    subset_arguments(p, images=2000, augment=0, rounds=3, rounds_flag="--runs")
    a = p.parse_args(argv)
    import convcache.extract.engine as engine
    import convcache.extract.runner as runner
    import convcache.store.writer as writer
    from convcache.runtime import cpu_model

    spent: dict = {}

    def timed(owner, name: str, label: str) -> None:
        f = getattr(owner, name)

        @functools.wraps(f)
        def wrapper(*args, **kw):
            t, c = time.perf_counter(), time.process_time()
            try:
                return f(*args, **kw)
            finally:
                w0, c0 = spent.get(label, (0.0, 0.0))
                spent[label] = (w0 + time.perf_counter() - t, c0 + time.process_time() - c)
        setattr(owner, name, wrapper)

    for owner, name, label in ((runner, "ExtractorSession", "contract (model read, identity)"),
                               (writer.SplitWriter, "__init__", "open or create the split"),
                               (engine.LocalExecutor, "hash_files", "hash the files"),
                               (writer.SplitWriter, "save_stat_cache", "stat cache"),
                               (writer.SplitWriter, "save_listing", "listing"),
                               (engine, "_run_blocks", "rows (decode, warp, batches, writes, commits)"),
                               (writer.SplitWriter, "commit", "commits' attributes and snapshots (those inside rows too)"),
                               (runner, "run_extract", "the whole run")):
        timed(owner, name, label)
    data, out = subset_and_output(a)

    def run(name: str):
        return runner.run_extract(runner.ExtractConfig(model=str(Path(a.model).resolve()), data=str(data),
                                                       output=str(out / name), augment=a.augment, progress=False,
                                                       device="null", workers=a.workers, decode_in="threads"))

    run("warm.zarr")
    print(f"{a.images} images x {a.augment + 1} copies, device null, {a.workers} workers, threads, {cpu_model()}; "
          "each cell: ms (cores busy)")
    rows = []
    for r in range(a.runs):
        spent.clear()
        s = run(f"{r}.zarr")
        rows.append(dict(spent))
        print(f"run {r + 1}: {s.rows_written} rows, {s.rows_per_second:,.0f} rows/s")
    print("| phase | " + " | ".join(f"run {r + 1}" for r in range(a.runs)) + " |")
    print("|---|" + "---|" * a.runs)
    for label in rows[0]:
        print(f"| {label} | " + " | ".join(f"{1e3 * got[label][0]:.0f} ({got[label][1] / got[label][0]:.2f})"
                                           for got in rows) + " |")


if __name__ == "__main__":
    main()
