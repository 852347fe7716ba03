"""Single-process extraction vs the same extraction on a Dask LocalCluster, in one run on the same
images (interleaved repeats), plus the scheduler's per-task overhead.

    .venv/bin/python experiments/bench_distributed.py --model runs/study/block5.onnx --images 600 --repeats 2

The model must be an exported extractor (`convcache export`); the images are the first N/2 train
photos of each class of the shared data (symlinked, never copied). Prints one JSON line per run and
a summary; the figures in docs/benchmarks.md come from this script.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from convcache.extract.runner import ExtractConfig, run_extract
from convcache.runtime import cpu_model


def subset(data: str, n: int, dst: Path) -> Path:
    for name in ("cats", "dogs"):
        files = sorted((Path(data) / "train" / name).glob("*.jpg"))[: n // 2]
        (dst / "train" / name).mkdir(parents=True)
        for f in files:
            (dst / "train" / name / f.name).symlink_to(f.resolve())
    return dst


def task_overhead(n_workers: int, tasks: int = 2000) -> float:
    """Milliseconds of scheduler round trip per trivial task on a LocalCluster (no work in the task)."""
    import logging

    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=n_workers, threads_per_worker=1, dashboard_address=":0",
                      silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        client.gather(client.map(lambda x: x, range(100), pure=False))  # warm
        t = time.perf_counter()
        client.gather(client.map(lambda x: x, range(tasks), pure=False))
        return 1000 * (time.perf_counter() - t) / tasks


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--data", default="../shared/data/cats_and_dogs_small")
    p.add_argument("--images", type=int, default=600)
    p.add_argument("--augment", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--rows-per-task", type=int, default=None)
    p.add_argument("--chunk-rows", type=int, default=None, help="the store's chunking, the same for both modes "
                                                                  "(a task is at least one chunk)")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-dist-"))
    data = subset(args.data, args.images, tmp / "data")
    rates = {"single": [], "dask": []}
    try:
        for rep in range(args.repeats):
            for mode in ("single", "dask"):
                out = tmp / f"{mode}-{rep}.zarr"
                cfg = ExtractConfig(model=args.model, data=str(data), output=str(out), augment=args.augment,
                                    progress=False, rows_per_task=args.rows_per_task, chunk_rows=args.chunk_rows,
                                    cluster=f"local:{args.workers}" if mode == "dask" else None)
                t = time.perf_counter()
                s = run_extract(cfg)
                wall = time.perf_counter() - t
                rates[mode].append(s.rows_written / wall)
                steady = s.rows_written / s.phases["run"] if "run" in s.phases else None
                if steady:
                    rates.setdefault("dask_tasks_only", []).append(steady)
                print(json.dumps({"mode": mode, "rep": rep, "rows": s.rows_written, "wall_s": round(wall, 2),
                                  "rows_per_s": round(s.rows_written / wall, 2), "provider": s.provider,
                                  "phases_s": {k: round(v, 2) for k, v in s.phases.items()}}), flush=True)
                shutil.rmtree(out)
        overhead = task_overhead(args.workers)
        single, dask = statistics.median(rates["single"]), statistics.median(rates["dask"])
        print(json.dumps({"cpu": cpu_model(), "images": args.images, "augment": args.augment,
                          "single_rows_per_s": round(single, 2), "dask_rows_per_s": round(dask, 2),
                          "ratio_dask_over_single": round(dask / single, 3),
                          "ratio_dask_tasks_phase_over_single": round(statistics.median(rates["dask_tasks_only"])
                                                                      / single, 3),
                          "chunk_rows": args.chunk_rows, "rows_per_task": args.rows_per_task,
                          "scheduler_ms_per_trivial_task": round(overhead, 3),
                          "note": "wall time includes listing, hashing, cluster start-up (dask) and commits"}))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
