"""The runtime's start-up beside the files' hashing (issue 29), against the same run with the session made first,
as before: paired rounds, the order alternating, each arm into a new store. A run's seconds, its runtime start-up
(`phases["session"]`) and what of it the first batch waited for (`phases["session_wait"]`).

    PYTHONPATH=. .venv/bin/python experiments/session_overlap.py --model runs/ext.onnx --device cpu \\
        --data ../shared/data/cats_and_dogs_small --images 100 --rounds 7
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from convcache.benchmarks.extract import subset_and_output, subset_arguments

    subset_arguments(p, images=100, augment=0, rounds=7)
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    import convcache.extract.runner as runner
    from convcache.extract.engine import ExtractorSession
    from convcache.runtime import cpu_model

    data, out = subset_and_output(a)
    background = runner.ExtractorSession

    def first(*args, **kw):  # as before: the session made before anything else
        return ExtractorSession(*args, **{**kw, "background": False})

    def run(arm: str, name: str):
        runner.ExtractorSession = background if arm == "beside hashing" else first
        try:
            return runner.run_extract(runner.ExtractConfig(model=str(Path(a.model).resolve()), data=str(data),
                                                           output=str(out / name), augment=a.augment,
                                                           progress=False, device=a.device, workers=a.workers))
        finally:
            runner.ExtractorSession = background

    arms = ("session first", "beside hashing")
    run(arms[1], "warm.zarr")
    got: dict = {arm: [] for arm in arms}
    for r in range(a.rounds):
        for arm in (arms if r % 2 == 0 else arms[::-1]):
            s = run(arm, f"{r}-{arm.replace(' ', '-')}.zarr")
            got[arm].append((s.seconds, s.phases.get("session", 0.0), s.phases.get("session_wait", 0.0)))
    print(f"{a.images} images x {a.augment + 1} copies, device {a.device}, {a.workers} workers, {a.rounds} rounds "
          f"(order alternating), {cpu_model()}")
    print("| arm | seconds (median; lowest-highest) | runtime start-up s (median) | first batch waited s (median) |")
    print("|---|---|---|---|")
    for arm in arms:
        sec = [x[0] for x in got[arm]]
        print(f"| {arm} | {statistics.median(sec):.3f} ({min(sec):.3f}-{max(sec):.3f}) | "
              f"{statistics.median(x[1] for x in got[arm]):.3f} | {statistics.median(x[2] for x in got[arm]):.3f} |")
    ratios = [f / b for (f, _, _), (b, _, _) in zip(got[arms[0]], got[arms[1]])]
    print(f"seconds, session first / beside hashing, per round: median {statistics.median(ratios):.3f} "
          f"(lowest-highest {min(ratios):.3f}-{max(ratios):.3f}); beside hashing faster in "
          f"{sum(x > 1 for x in ratios)} of {len(ratios)}")


if __name__ == "__main__":
    main()
