"""Triton's own load generator, `perf_analyzer`, against `convcache serve` over HTTP (the Open Inference
Protocol), at several concurrencies, for each batching mode in one run: `--batch-wait adaptive` (a batch waits
for company only while more images are on their way) against `fixed` (always waits `--max-wait-ms`, as
Triton's max_queue_delay). Each request is one real photo's pixels at the model's size (perf_analyzer's
--input-data JSON, cycling through the photos); the answer cache is off, so every request is inferred.

    python experiments/bench_perf_analyzer.py --model runs/model.onnx \
        --data ../shared/data/cats_and_dogs_small/validation --perf-analyzer PATH/perf_analyzer -o runs/pa

perf_analyzer: the binary in tritonclient 2.46.0's wheel (`data/bin/perf_analyzer`) runs on Debian 12
with Debian's libb64-0d and PyPI's nvidia-cuda-runtime-cu12 on LD_LIBRARY_PATH (newer wheels need glibc
2.38; PyPI's `perf-analyzer` package is an empty placeholder). docs/benchmarks.md has the figures.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from convcache.serve import Predictor


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def input_data(model: str, data: str, n: int, out: Path) -> Path:
    predictor = Predictor(model)
    photos = sorted(Path(data).rglob("*.jpg"))[:: max(1, len(list(Path(data).rglob("*.jpg"))) // n)][:n]
    rows = [{"images": {"content": predictor.to_pixels(p.read_bytes()).astype(np.float32).ravel().tolist(),
                        "shape": [predictor.size, predictor.size, 3]}} for p in photos]
    out.write_text(json.dumps({"data": rows}))
    return out


def serve(model: str, mode: str, max_wait_ms: float):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "convcache", "serve", "--model", model, "--port", str(port),
                             "--name", "m", "--cache-mb", "0", "--batch-wait", mode, "--max-wait-ms",
                             str(max_wait_ms), "-q"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(proc.stderr.read().decode())
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status_code == 200:
                return proc, port
        except httpx.HTTPError:
            time.sleep(0.2)
    raise SystemExit("the server did not become ready")


def perf_analyzer(binary: str, port: int, concurrency: int, interval_ms: int, data: Path, out: Path) -> dict:
    csv_path = out / f"pa-{port}-{concurrency}.csv"
    cmd = [binary, "-m", "m", "-u", f"127.0.0.1:{port}", "-i", "http", "--concurrency-range",
           f"{concurrency}:{concurrency}", "--measurement-interval", str(interval_ms), "--input-data", str(data),
           "-f", str(csv_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise SystemExit(f"perf_analyzer failed ({r.returncode}): {r.stdout[-2000:]}{r.stderr[-2000:]}")
    with open(csv_path) as f:
        row = next(csv.DictReader(f))
    return {"concurrency": concurrency, "throughput": float(row["Inferences/Second"]),
            "p50_ms": int(row["p50 latency"]) / 1000, "p99_ms": int(row["p99 latency"]) / 1000,
            "queue_ms": int(row["Server Queue"]) / 1000, "infer_ms": int(row["Server Compute Infer"]) / 1000}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="a folder of JPEGs (searched recursively)")
    p.add_argument("--perf-analyzer", required=True, help="the perf_analyzer binary")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--modes", nargs="+", default=["adaptive", "fixed"])
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--interval-ms", type=int, default=5000)
    p.add_argument("--photos", type=int, default=64)
    p.add_argument("-o", "--output", required=True)
    a = p.parse_args()
    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    data = input_data(a.model, a.data, a.photos, out / "input.json")
    cpu = next((line.split(":", 1)[1].strip() for line in subprocess.run(["lscpu"], capture_output=True,
                text=True).stdout.splitlines() if line.startswith("Model name")), "?")
    results = {"cpu": cpu, "cores": os.cpu_count(), "max_wait_ms": a.max_wait_ms, "runs": []}
    for mode in a.modes:
        proc, port = serve(a.model, mode, a.max_wait_ms)
        try:
            for c in a.concurrency:
                got = perf_analyzer(a.perf_analyzer, port, c, a.interval_ms, data, out) | {"mode": mode}
                results["runs"].append(got)
                print(json.dumps(got), flush=True)
        finally:
            proc.terminate()
            proc.wait(30)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    by = {(r["mode"], r["concurrency"]): r for r in results["runs"]}
    print(f"\n{cpu}, {os.cpu_count()} cores, --max-wait-ms {a.max_wait_ms}\n")
    print("| clients | " + " | ".join(f"{m} infer/s | {m} p50 / p99 ms" for m in a.modes) + " | ratio |")
    print("|---" * (2 * len(a.modes) + 2) + "|")
    for c in a.concurrency:
        cells = [f"{by[m, c]['throughput']:.1f} | {by[m, c]['p50_ms']:.1f} / {by[m, c]['p99_ms']:.1f}" for m in a.modes]
        ratio = by[a.modes[0], c]["throughput"] / by[a.modes[-1], c]["throughput"]
        print(f"| {c} | " + " | ".join(cells) + f" | {ratio:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
