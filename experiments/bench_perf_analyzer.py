"""Triton's own load generator, `perf_analyzer`, against `convcache serve` and against Triton serving the
same fused model, over HTTP and gRPC, at several concurrencies, interleaved in rounds. Three servers, all up
for the whole run:
- `convcache`: `convcache serve --grpc-port` (`--batch-wait adaptive`, 5 ms, the answer cache off, so every
  request is inferred);
- `triton`: the real tritonserver (nvidia-pytriton's binary) on the repository `convcache triton --backend
  python` writes (model.py running ONNX Runtime, Triton's dynamic batcher: preferred 8 and 32, 5 ms);
- `pytriton`: the same model bound through PyTriton's Python API (experiments/pytriton_peer.py, the same
  batcher).
Each round runs every concurrency and protocol against each server, the servers' order rotating round to
round. Each request is one real photo's pixels at the model's size (perf_analyzer's --input-data JSON,
cycling through the photos). Every run's figures are kept (results.json), and the summary gives, per
cell, the median over rounds and convcache's ratio to each peer with a 95% t-interval over rounds (paired
by round) and how many rounds it was ahead.

    make tritonserver
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
from convcache.stats import ratio_text


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


def wait_ready(url: str, proc: subprocess.Popen, what: str) -> None:
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited ({proc.returncode})")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{what} did not become ready")


def start(arm: str, model: str, max_wait_ms: float, work: Path, log) -> tuple[subprocess.Popen, int, int]:
    """One server, ready; returns it with its HTTP and gRPC ports. The model is named `m` everywhere."""
    http, grpc_ = free_port(), free_port()
    if arm == "convcache":
        argv = [sys.executable, "-m", "convcache", "serve", "--model", model, "--port", str(http), "--grpc-port",
                str(grpc_), "--name", "m", "--cache-mb", "0", "--max-wait-ms", str(max_wait_ms), "-q"]
        env = None
    elif arm == "triton":
        from convcache.serve.triton import write_repository
        from convcache.serve.tritonserver import default_distribution

        dist = default_distribution(Path(__file__).resolve().parent.parent)
        if problem := dist.problem():
            raise SystemExit(f"tritonserver cannot run: {problem}")
        repo = write_repository(model, str(work / "repo"), name="m", backend="python",
                                delay_us=int(max_wait_ms * 1000)).parent
        argv, env = dist.command(repo, work, http, grpc_, free_port())
    elif arm == "pytriton":
        from convcache.serve.tritonserver import default_distribution

        python = default_distribution(Path(__file__).resolve().parent.parent).python
        argv = [str(python), str(Path(__file__).with_name("pytriton_peer.py")), "--model", model, "--http-port",
                str(http), "--grpc-port", str(grpc_), "--metrics-port", str(free_port()),
                "--delay-us", str(int(max_wait_ms * 1000))]
        env = None
    else:
        raise SystemExit(f"unknown arm {arm}")
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    wait_ready(f"http://127.0.0.1:{http}/v2/models/m/ready", proc, arm)
    return proc, http, grpc_


def perf_analyzer(binary: str, url: str, protocol: str, concurrency: int, interval_ms: int, data: Path,
                  out: Path) -> dict:
    """One perf_analyzer measurement. A window is at least 400 ms per client (a window of 4 s holds ~4 answers
    a client at 16 clients), and where the windows do not agree within perf_analyzer's 10% in 20 trials the
    measurement is retried once with windows twice as long (the same rule for every server: `tries` says)."""
    csv_path = out / "pa.csv"
    window = max(interval_ms, 400 * concurrency)
    for tries in (1, 2):
        cmd = [binary, "-m", "m", "-u", url, "-i", protocol, "--concurrency-range", f"{concurrency}:{concurrency}",
               "--measurement-interval", str(window), "--max-trials", "20", "--input-data", str(data),
               "-f", str(csv_path)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if r.returncode == 0:
            break
        if "stable measurement" not in r.stdout + r.stderr or tries == 2:
            raise SystemExit(f"perf_analyzer failed ({r.returncode}): {r.stdout[-2000:]}{r.stderr[-2000:]}")
        window *= 2
    with open(csv_path) as f:
        row = next(csv.DictReader(f))
    return {"concurrency": concurrency, "protocol": protocol, "window_ms": window, "tries": tries,
            "throughput": float(row["Inferences/Second"]),
            "p50_ms": int(row["p50 latency"]) / 1000, "p99_ms": int(row["p99 latency"]) / 1000,
            "queue_ms": int(row["Server Queue"]) / 1000, "infer_ms": int(row["Server Compute Infer"]) / 1000}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="a folder of JPEGs (searched recursively)")
    p.add_argument("--perf-analyzer", required=True, help="the perf_analyzer binary")
    p.add_argument("--arms", nargs="+", default=["convcache", "triton", "pytriton"])
    p.add_argument("--protocols", nargs="+", default=["http", "grpc"])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--interval-ms", type=int, default=4000)
    p.add_argument("--photos", type=int, default=64)
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--idle-only", action="store_true",
                   help="start the servers, print each one's CPU use while unloaded (5 s), and stop")
    a = p.parse_args()
    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    data = input_data(a.model, a.data, a.photos, out / "input.json")
    cpu = next((line.split(":", 1)[1].strip() for line in subprocess.run(["lscpu"], capture_output=True,
                text=True).stdout.splitlines() if line.startswith("Model name")), "?")
    results = {"cpu": cpu, "cores": os.cpu_count(), "max_wait_ms": a.max_wait_ms, "interval_ms": a.interval_ms,
               "arms": a.arms, "runs": []}
    servers = {}
    try:
        for arm in a.arms:
            log = open(out / f"{arm}.log", "w")
            servers[arm] = start(arm, a.model, a.max_wait_ms, out / f"work-{arm}", log)
        # an idle server that polls takes CPU from the one being measured (LitServe does: docs/benchmarks.md)
        from convcache.benchmarks.serve import idle_cpu

        results["idle_cpu_of_a_core"] = idle_cpu({arm: proc.pid for arm, (proc, _, _) in servers.items()})
        print("idle CPU, all servers up and unloaded, 5 s: " + ", ".join(
            f"{arm} {100 * v:.1f}% of a core" for arm, v in results["idle_cpu_of_a_core"].items()), flush=True)
        if a.idle_only:
            return 0
        for r in range(a.rounds):
            order = a.arms[r % len(a.arms):] + a.arms[:r % len(a.arms)]
            for c in a.concurrency:
                for protocol in a.protocols:
                    for arm in order:
                        _, http, grpc_ = servers[arm]
                        url = f"127.0.0.1:{http if protocol == 'http' else grpc_}"
                        got = perf_analyzer(a.perf_analyzer, url, protocol, c, a.interval_ms, data, out)
                        got |= {"arm": arm, "round": r}
                        results["runs"].append(got)
                        print(json.dumps(got), flush=True)
                        (out / "results.json").write_text(json.dumps(results, indent=1))
    finally:
        for proc, _, _ in servers.values():
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    by = {(x["arm"], x["protocol"], x["concurrency"], x["round"]): x for x in results["runs"]}
    rounds = range(a.rounds)
    print(f"\n{cpu}, {os.cpu_count()} cores, {a.rounds} rounds, --max-wait-ms {a.max_wait_ms}; "
          "median infer/s over rounds (p50 / p99 ms of the median round)\n")
    peers = [x for x in a.arms if x != "convcache"]
    print("| protocol | clients | " + " | ".join(a.arms) + " | " +
          " | ".join(f"convcache / {x}" for x in peers) + " |")
    print("|---" * (2 + len(a.arms) + len(peers)) + "|")
    for protocol in a.protocols:
        for c in a.concurrency:
            cells = []
            for arm in a.arms:
                runs = sorted((by[arm, protocol, c, r] for r in rounds), key=lambda x: x["throughput"])
                mid = runs[len(runs) // 2]
                cells.append(f"{mid['throughput']:.1f} ({mid['p50_ms']:.0f} / {mid['p99_ms']:.0f})")
            for peer in peers:
                ratios = [by["convcache", protocol, c, r]["throughput"] / by[peer, protocol, c, r]["throughput"]
                          for r in rounds]
                cells.append(ratio_text(ratios))
            print(f"| {protocol} | {c} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
