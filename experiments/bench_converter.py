"""`convcache export --converter direct` against `--converter tf2onnx`: each export a fresh process, the two
alternating round by round; peak resident memory (the process's maxrss) and wall time of each, the graph
identities and the largest difference between the two models' features on the same images.

    .venv/bin/python experiments/bench_converter.py --weights hed --size 150 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def export(converter: str, args, out: Path) -> tuple[float, float]:
    """(seconds, peak RSS in GiB) of one `convcache export` in its own process."""
    cmd = [sys.executable, "-m", "convcache", "export", "--weights", args.weights, "--input-size", str(args.size),
           "--converter", converter, "-q", "-o", str(out), *(["--layer", args.layer] if args.layer else []),
           *(["--pooling", args.pooling] if args.pooling else [])]
    start = time.perf_counter()
    pid = subprocess.Popen(cmd, stdout=subprocess.DEVNULL).pid
    _, status, usage = os.wait4(pid, 0)
    if status != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({status})")
    return time.perf_counter() - start, usage.ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default="hed")
    p.add_argument("--size", type=int, default=150)
    p.add_argument("--layer")
    p.add_argument("--pooling")
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    cpu = next((line.split(":", 1)[1].strip() for line in subprocess.run(
        ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name")), "?")
    print(f"CPU: {cpu}, {os.cpu_count()} cores; {a.weights} weights, {a.size} px, layer {a.layer or 'block5_pool'}, "
          f"pooling {a.pooling}, {a.rounds} rounds, the converters alternating")
    arms = ["direct", "tf2onnx"]
    seen: dict = {c: [] for c in arms}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {c: Path(tmp) / f"{c}.onnx" for c in arms}
        for r in range(a.rounds):
            for c in arms if r % 2 == 0 else arms[::-1]:
                seen[c].append(export(c, a, paths[c]))
                print(f"round {r + 1}, {c}: {seen[c][-1][0]:.1f} s, peak {seen[c][-1][1]:.2f} GiB", flush=True)
        from convcache.artifacts import read
        from convcache.export.onnx_target import sample_images
        from convcache.runtime import create_session

        models = {c: read(paths[c]) for c in arms}
        images = sample_images(8, a.size, seed=7)
        feats = {c: create_session(str(paths[c]), "cpu").run(None, {"images": images})[0] for c in arms}
        diff = float(np.abs(feats["direct"] - feats["tf2onnx"]).max())
        print("\n| converter | wall s (median) | peak RSS GiB (median) | identity |")
        print("|---|---|---|---|")
        for c in arms:
            print(f"| {c} | {statistics.median(s for s, _ in seen[c]):.1f} | "
                  f"{statistics.median(m for _, m in seen[c]):.2f} | {models[c].identity[:12]} |")
        ratio_t = statistics.median(d[0] / t[0] for d, t in zip(seen["direct"], seen["tf2onnx"]))
        ratio_m = statistics.median(d[1] / t[1] for d, t in zip(seen["direct"], seen["tf2onnx"]))
        print(f"\ndirect / tf2onnx, median of the per-round ratios: time {ratio_t:.2f}x, peak memory {ratio_m:.2f}x; "
              f"same identity: {models['direct'].identity == models['tf2onnx'].identity}; features' largest "
              f"difference on 8 images: {diff:.3g} (largest feature {float(np.abs(feats['tf2onnx']).max()):.3g})")


if __name__ == "__main__":
    main()
