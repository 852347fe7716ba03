"""`convcache predict` over a folder: two checkouts' CLI, end to end, in alternating rounds, on the same photos;
and (`--null`) the feed alone, the runtime taken out.

Each round runs `python -m convcache predict --model M FOLDER -q` once from each checkout (the working directory
is the checkout, so its own `convcache` is imported), the order alternating, and times the whole command (start-up,
the model's load, every photo answered). Also checks that both answer every photo with the same class and
probabilities to 1e-5. Prints a table and writes the raw rounds as JSON.

`--null` measures, in this process (this checkout's code), what predict's loop can feed a runtime: the fused
model's `infer` replaced by zeros of its shape (as `bench extract --device null` does for extract), the photos
answered one at a time (`Predictor.predict(path)` in a loop: predict's loop before `predict_each`) against
`Predictor.predict_each` at 1 and at all cores' workers, alternating, and Pillow's own decode in one thread
(`Predictor.decode` in a loop) as the peer.

    PYTHONPATH=. .venv/bin/python experiments/bench_predict.py --null --model runs/fused.onnx \
        --data ../shared/data/cats_and_dogs_small/validation --rounds 5

    PYTHONPATH=. .venv/bin/python experiments/bench_predict.py --model runs/fused.onnx \\
        --data ../shared/data/cats_and_dogs_small/validation --before /work/wt_old --after . --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor()


def run(checkout: Path, args: list[str]) -> tuple[float, list[dict]]:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "convcache", "predict", *args, "-q"], cwd=checkout,
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(checkout)})
    seconds = time.perf_counter() - t0
    if r.returncode not in (0, 3):
        raise SystemExit(f"{checkout}: rc {r.returncode}: {r.stderr[-2000:]}")
    return seconds, [json.loads(line) for line in r.stdout.splitlines()]


def null_feed(a) -> int:
    import numpy as np

    from convcache.runtime import available_cores
    from convcache.serve.predictor import Predictor

    p = Predictor(a.model, "cpu", a.batch_size)
    zeros = (np.zeros(len(p.classes), np.float32), np.zeros(1, np.float32))
    p.infer = lambda pixels: (np.tile(zeros[0], (len(pixels), 1)), np.tile(zeros[1], (len(pixels), 1)))
    paths = sorted(str(f) for f in Path(a.data).rglob("*") if f.is_file())
    cores = available_cores()

    def one_at_a_time():
        for x in paths:
            p.predict(x)

    def decode_only():
        for x in paths:
            p.decode(x)

    arms = {"decode only, 1 thread (Pillow's rate on one core)": decode_only,
            "one at a time (predict before)": one_at_a_time,
            "predict_each, 1 worker": lambda: sum(1 for _ in p.predict_each(paths, 1)),
            f"predict_each, {cores} workers (default)": lambda: sum(1 for _ in p.predict_each(paths, cores))}
    for f in arms.values():  # warm: the files in the page cache
        f()
        break
    rates = {k: [] for k in arms}
    for i in range(a.rounds):
        names = list(arms) if i % 2 == 0 else list(reversed(arms))
        for k in names:
            t0 = time.perf_counter()
            arms[k]()
            rates[k].append(len(paths) / (time.perf_counter() - t0))
        print(f"round {i + 1}: " + ", ".join(f"{k}: {rates[k][-1]:,.0f}" for k in arms), flush=True)
    peer = list(arms)[0]
    ratio = {k: [v / w for v, w in zip(rates[k], rates[peer])] for k in arms}
    print(f"\nCPU {cpu_model()}, {cores} cores, {len(paths)} photos, batch {a.batch_size}, {a.rounds} rounds; "
          "inference replaced by zeros")
    print("| arm | images/s (median; range) | vs Pillow on one core, same round: median (range) |\n|---|---|---|")
    for k in arms:
        r = ratio[k]
        print(f"| {k} | {statistics.median(rates[k]):,.0f} ({min(rates[k]):,.0f}-{max(rates[k]):,.0f}) | "
              f"{statistics.median(r):.2f} ({min(r):.2f}-{max(r):.2f}) |")
    if a.out:
        Path(a.out).write_text(json.dumps({"cpu": cpu_model(), "cores": cores, "images": len(paths),
                                           "batch_size": a.batch_size, "rates": rates}, indent=1) + "\n")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--null", action="store_true", help="the feed alone, in this process (see above)")
    ap.add_argument("--batch-size", type=int, default=32, help="--null: images an inference call")
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="a folder of photos (walked as predict walks it)")
    ap.add_argument("--before", help="a checkout (worktree) of the code before")
    ap.add_argument("--after", help="a checkout of the code after")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--extra", nargs="*", default=[], help="more predict arguments for both")
    ap.add_argument("--out", help="raw rounds as JSON")
    a = ap.parse_args()
    if a.null:
        return null_feed(a)
    if not (a.before and a.after):
        ap.error("--before and --after (or --null)")
    arms = {"before": Path(a.before).resolve(), "after": Path(a.after).resolve()}
    args = ["--model", str(Path(a.model).resolve()), str(Path(a.data).resolve()), *a.extra]
    rounds = []
    answers = {}
    for i in range(a.rounds):
        order = list(arms) if i % 2 == 0 else list(reversed(arms))
        got = {}
        for name in order:
            seconds, lines = run(arms[name], args)
            got[name] = seconds
            answers[name] = lines
        n = len(answers["after"])
        rounds.append({"order": order, "seconds": got, "images": n,
                       "ratio_after_over_before": (n / got["after"]) / (n / got["before"])})
        print(f"round {i + 1}: " + ", ".join(f"{k} {n / v:,.1f} img/s ({v:.2f} s)" for k, v in got.items())
              + f", ratio {rounds[-1]['ratio_after_over_before']:.2f}", flush=True)
    b, f = answers["before"], answers["after"]
    same = len(b) == len(f) and all(
        x["image"] == y["image"] and x.get("class") == y.get("class") and x.get("error") == y.get("error")
        and all(abs(x["probabilities"][c] - y["probabilities"][c]) <= 1e-5 for c in x.get("probabilities", {}))
        for x, y in zip(b, f))
    ratios = [r["ratio_after_over_before"] for r in rounds]
    n = rounds[0]["images"]
    med = {k: statistics.median(n / r["seconds"][k] for r in rounds) for k in arms}
    summary = {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "images": n, "args": args,
               "median_images_per_s": med, "ratio_median": statistics.median(ratios),
               "ratio_range": [min(ratios), max(ratios)], "same_answers": same, "rounds": rounds}
    print(f"\nCPU {summary['cpu']}, {summary['cores']} cores, {n} photos, {a.rounds} rounds")
    print("| arm | images/s end to end (median) |\n|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:,.1f} |")
    print(f"per-round ratio after/before: median {summary['ratio_median']:.2f} "
          f"({min(ratios):.2f}-{max(ratios):.2f}); same answers: {same}")
    if a.out:
        Path(a.out).write_text(json.dumps(summary, indent=1) + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
