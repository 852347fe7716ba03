"""One null-device extract run (no inference: zeros of the extractor's output shape) with the convcache of the
checkout it runs in (with PYTHONPATH=., checked; printed first), printing rows, rows/s and the extracting
process's CPU µs per row (its main thread, the whole process, and by thread; decoder processes are not counted). Run from two checkouts in turn for an interleaved A/B of the
input pipeline across commits, as docs/benchmarks.md does ("The CUDA path without a GPU"):

    git worktree add /tmp/before <commit>
    for r in 1 2 3 4 5; do for dir in /tmp/before .; do for way in processes threads; do
      (cd $dir && PYTHONPATH=. /path/to/.venv/bin/python /path/to/experiments/null_rate.py --model runs/ext.onnx \\
         --augment 15 --images 320 --decode-in $way --work /tmp/nab); done; done; done
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="an extractor (its output shape is all the null device uses)")
    p.add_argument("--data", default="../shared/data/cats_and_dogs_small")
    p.add_argument("--images", type=int, default=320)
    p.add_argument("--augment", type=int, default=15)
    p.add_argument("--decode-in", default="processes", choices=["processes", "threads", "auto"])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--work", default=tempfile.gettempdir(), help="where the photo subset and the stores go")
    p.add_argument("--warm", action="store_true", help="measure a second run in this process")
    a = p.parse_args(argv)
    import os
    from dataclasses import replace

    import convcache

    # an A/B across commits must run each checkout's convcache, not the one the environment installed (an editable
    # install points every checkout's run at one tree: the A/B would compare a commit with itself): PYTHONPATH=.
    here = Path(convcache.__file__).resolve().parent.parent
    if here != Path(os.getcwd()).resolve() and (Path(os.getcwd()) / "convcache").is_dir():
        raise SystemExit(f"null_rate.py: convcache is imported from {here}, not from this checkout "
                         f"({os.getcwd()}); run it with PYTHONPATH=.")
    print(f"convcache from {here}")
    from convcache.benchmarks.extract import cached_subset
    from convcache.benchmarks.threadcpu import ThreadCPU
    from convcache.extract.runner import ExtractConfig, run_extract

    work = Path(a.work)
    data = cached_subset(a.data, a.images, work)
    out = Path(tempfile.mkdtemp(dir=work)) / "s.zarr"
    cfg = ExtractConfig(model=str(Path(a.model).resolve()), data=str(data), output=str(out), augment=a.augment,
                        batch_size=128, progress=False, device="null", workers=a.workers, decode_in=a.decode_in)
    if a.warm:  # a first run in this process: imports and the forkserver out of the measured one
        run_extract(replace(cfg, output=str(out.parent / "warm.zarr")))
    r0, t0, m0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter(), time.thread_time()
    with ThreadCPU() as threads:
        s = run_extract(cfg)
    wall, main_cpu = time.perf_counter() - t0, time.thread_time() - m0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    own = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    n = s.rows_written
    print(f"rows {n} rows/s {n / wall:.1f} main-thread-us/row {1e6 * main_cpu / n:.1f} "
          f"process-us/row {1e6 * own / n:.1f} decodes {s.decodes} decode_in {s.decode_in}")
    print("  CPU us/row by thread: " + ", ".join(f"{name} {1e6 * sec / n:.0f}" for name, sec in
                                                 sorted(threads.seconds.items(), key=lambda kv: -kv[1])))


if __name__ == "__main__":
    main()
