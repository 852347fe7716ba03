"""The HTTP service under load on loopback (an asyncio httpx client), against the bare Predictor
rate on the same images, in one run; cache-hit latency; RSS over 10,000 requests with 10% bad input.

    .venv/bin/convcache bench serve --model runs/model.onnx --data ../shared/data/cats_and_dogs_small
    .venv/bin/convcache bench serve --model runs/model.onnx --data ... --peer litserve   # against LitServe
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from convcache.serve import Predictor


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: str, *args: str):
        self.url = f"http://127.0.0.1:{(port := free_port())}"
        self.proc = subprocess.Popen([sys.executable, "-m", "convcache", "serve", "--model", model, "--port",
                                      str(port), *args])
        for _ in range(600):
            try:
                if httpx.get(self.url + "/readyz").status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("server did not start")

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


async def load(url: str, bodies: list[bytes], concurrency: int, n: int, path: str = "/v1/predict",
               multipart: bool = False) -> tuple[float, list[float], dict]:
    latencies, codes = [], {}
    counter = iter(range(n))

    async def worker(client):
        for i in counter:
            t = time.perf_counter()
            body = bodies[i % len(bodies)]
            if multipart:
                r = await client.post(url + path, files={"image": ("image.jpg", body, "image/jpeg")})
            else:
                r = await client.post(url + path, content=body)
            latencies.append(time.perf_counter() - t)
            codes[r.status_code] = codes.get(r.status_code, 0) + 1

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        return n / (time.perf_counter() - start), latencies, codes


def pct(xs, q) -> float:
    return 1000 * float(np.percentile(xs, q))


def bad_inputs() -> list[bytes]:
    import struct

    big = io.BytesIO()
    Image.new("L", (9000, 9000)).save(big, "PNG")  # 81 M pixels, over the 40 M limit
    bomb = io.BytesIO()
    Image.new("I;16", (6300, 6300), 1000).save(bomb, "PNG")  # ~77 KB, 40 M 16-bit pixels: the decode bomb
    hdr = bytearray(124)
    struct.pack_into("<IIIIIII", hdr, 0, 124, 0x1007, 8, 8, 0, 0, 0)
    struct.pack_into("<II", hdr, 72, 32, 0)  # a DDS whose pixel format Pillow cannot handle
    return [b"not an image", b"", b"\xff\xd8\xff\xe0" + bytes(900), big.getvalue(), bomb.getvalue(),
            b"DDS " + bytes(hdr) + bytes(256)]


class LitServePeer:
    """The same model behind LitServe (`convcache.benchmarks.litserve_peer`), LitServe's batching set as ours."""

    def __init__(self, model: str, max_batch: int, wait_s: float):
        self.url = f"http://127.0.0.1:{(port := free_port())}"
        self.proc = subprocess.Popen([sys.executable, "-m", "convcache.benchmarks.litserve_peer", model, str(port),
                                      str(max_batch), str(wait_s)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        for _ in range(1200):
            try:
                if httpx.get(self.url + "/health").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("LitServe did not start")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def process_tree(pid: int) -> list:
    """psutil.Process objects of `pid` and all its descendants (LitServe's server has several processes)."""
    import psutil

    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by `pid`'s process tree."""
    import psutil

    total = 0.0
    for p in process_tree(pid):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


class Paused:
    """`with Paused(pid):` the process tree is stopped (SIGSTOP) inside the block and continued after it: a
    server that is not being measured takes no CPU from the one that is (an idle server can poll: LitServe's
    inference worker waits on its queue with 1-ms timeouts)."""

    def __init__(self, pid: int | None):
        self.procs = process_tree(pid) if pid is not None else []

    def __enter__(self):
        for p in self.procs:
            p.suspend()
        return self

    def __exit__(self, *exc):
        for p in reversed(self.procs):
            p.resume()


def idle_cpu(pids: dict, seconds: float = 5.0) -> dict:
    """Each process tree's CPU use while nobody sends it anything, as a fraction of one core."""
    before = {k: cpu_seconds(pid) for k, pid in pids.items()}
    time.sleep(seconds)
    return {k: (cpu_seconds(pid) - before[k]) / seconds for k, pid in pids.items()}


def peer_litserve(model: str, bodies: list[bytes], rounds: int, clients=(1, 4, 16), pause: bool = True) -> dict:
    """Both servers up, the same multipart uploads, interleaved: each round runs every client count against
    both servers, which goes first alternating round to round, so drift in the machine's load falls on both.
    With `pause` the server not being measured is stopped (SIGSTOP, its whole process tree) for the other's
    turn, so that neither's idle work lands on the other's figure; each server's idle CPU is printed first.
    Prints each round's rates and, per client count, the geometric mean of the per-round ratios with a 95%
    t-interval (paired by round); returns the rates."""
    import statistics

    from convcache.stats import ratio_text

    ours = Server(model, "--cache-mb", "0", "--max-batch", "32", "--max-wait-ms", "5")
    peer = LitServePeer(model, 32, 0.005)
    rates: dict = {}
    lat: dict = {}
    arms = [("convcache", ours, "/v1/predict"), ("litserve", peer, "/predict")]
    try:
        for _, target, path in arms:  # warm-up
            asyncio.run(load(target.url, bodies[:8], 4, 16, path, multipart=True))
        idle = idle_cpu({name: target.proc.pid for name, target, _ in arms})
        print("idle CPU, both servers up and unloaded, 5 s: "
              + ", ".join(f"{name} {100 * v:.1f}% of a core" for name, v in idle.items())
              + ("; the server not being measured is paused (SIGSTOP) for the other's turn" if pause
                 else "; both stay running throughout (--no-pause)"), flush=True)
        for r in range(rounds):
            for c in clients:
                n = max(2 * len(bodies), 8 * c) if c > 1 else len(bodies)
                for name, target, path in arms if r % 2 == 0 else arms[::-1]:
                    other = next(t for k, t, _ in arms if k != name)
                    with Paused(other.proc.pid if pause else None):
                        rate, latencies, codes = asyncio.run(load(target.url, bodies, c, n, path, multipart=True))
                    if set(codes) != {200}:
                        raise RuntimeError(f"{name} at {c} clients answered {codes}")
                    rates.setdefault((name, c), []).append(rate)
                    lat.setdefault((name, c), []).extend(latencies)
                print(f"round {r + 1}, {c} clients: convcache {rates['convcache', c][-1]:.2f} img/s, "
                      f"LitServe {rates['litserve', c][-1]:.2f}", flush=True)
    finally:
        ours.stop()
        peer.stop()
    print(f"\nconvcache vs LitServe {_version('litserve')}, the same fused model and Predictor code, multipart "
          f"uploads, {rounds} interleaved rounds (median img/s; the ratio is the geometric mean of the rounds' "
          "ratios with a 95% t-interval; latency over all rounds)\n")
    print("| clients | convcache img/s | LitServe img/s | convcache / LitServe | convcache p50 / p99 ms | "
          "LitServe p50 / p99 ms |")
    print("|---|---|---|---|---|---|")
    for c in clients:
        a, b = rates["convcache", c], rates["litserve", c]
        print(f"| {c} | {statistics.median(a):.1f} | {statistics.median(b):.1f} | "
              f"{ratio_text([x / y for x, y in zip(a, b)])} | "
              f"{pct(lat['convcache', c], 50):.0f} / {pct(lat['convcache', c], 99):.0f} | "
              f"{pct(lat['litserve', c], 50):.0f} / {pct(lat['litserve', c], 99):.0f} |")
    return rates


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="convcache bench serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="runs/model.onnx")
    p.add_argument("--data", default="../shared/data/cats_and_dogs_small")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--soak", type=int, default=10_000)
    p.add_argument("--soak-clients", type=int, default=32)
    p.add_argument("--peer", choices=["litserve"], help="instead: the same model behind this peer, interleaved")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds against --peer")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="client counts")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "openvino", "auto"],
                   help="where the bare Predictor and the server run (default: %(default)s)")
    p.add_argument("--no-pause", action="store_true",
                   help="against --peer: keep the server not being measured running (not paused) during the "
                        "other's turn")
    a = p.parse_args(argv)
    folder = Path(a.data) / "validation" if (Path(a.data) / "validation").is_dir() else Path(a.data)
    files = sorted(folder.rglob("*.jpg"))
    files = files[:: max(1, len(files) // a.images)][: a.images]
    bodies = [f.read_bytes() for f in files]
    cpu = next((line.split(":", 1)[1].strip() for line in subprocess.run(
        ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name")), "?")
    print(f"CPU: {cpu}, {os.cpu_count()} cores")
    if a.peer == "litserve":
        peer_litserve(a.model, bodies, a.rounds, tuple(a.clients), pause=not a.no_pause)
        return

    predictor = Predictor(a.model, a.device)
    predictor.predict(bodies[:8])
    t = time.perf_counter()
    predictor.predict(bodies)
    bare = len(bodies) / (time.perf_counter() - t)
    where = f"{a.device} ({predictor.provider}, {predictor.io} io)"
    del predictor

    print(f"bare Predictor (decode + batch-32 inference) on {where}, {len(bodies)} images: {bare:.1f} img/s\n")
    print("| clients | requests | img/s | vs bare Predictor | p50 ms | p99 ms | statuses |")
    print("|---|---|---|---|---|---|---|")
    server = Server(a.model, "--cache-mb", "0", "--max-batch", "32", "--max-wait-ms", "5", "--device", a.device)
    try:
        asyncio.run(load(server.url, bodies[:4], 1, 4))  # warm-up
        for c in a.clients:
            n = max(2 * len(bodies), 8 * c) if c > 1 else len(bodies)
            rate, lat, codes = asyncio.run(load(server.url, bodies, c, n))
            print(f"| {c} | {n} | {rate:.1f} | {rate / bare:.2f}x | {pct(lat, 50):.0f} | {pct(lat, 99):.0f} "
                  f"| {codes} |")
    finally:
        server.stop()

    if not a.soak:  # --soak 0: the load table only
        return
    server = Server(a.model, "--cache-mb", "256", "--device", a.device)
    try:
        asyncio.run(load(server.url, bodies[:1], 1, 1))
        _, lat, _ = asyncio.run(load(server.url, bodies[:1], 1, 1000))
        print(f"\ncache hits, 1 client, 1,000 requests: p50 {pct(lat, 50):.2f} ms, p99 {pct(lat, 99):.2f} ms\n")
        bad = bad_inputs()
        mixed = [*bodies, *bad]
        weights = [0.9 / len(bodies)] * len(bodies) + [0.1 / len(bad)] * len(bad)
        order = np.random.default_rng(0).choice(len(mixed), a.soak, p=weights)
        seq = [mixed[i] for i in order]
        rss = [("start", server.rss_mib())]
        done, codes_total, lats = 0, {}, []
        parts = (1000, 4000, a.soak - 5000) if a.soak > 5000 else (a.soak // 3, a.soak // 3, a.soak - 2 * (a.soak // 3))
        for chunk in parts:
            _, lat, codes = asyncio.run(load(server.url, seq[done : done + chunk], a.soak_clients, chunk))
            lats += list(lat)
            done += chunk
            for k, v in codes.items():
                codes_total[k] = codes_total.get(k, 0) + v
            rss.append((f"after {done:,}", server.rss_mib()))
        print(f"soak: {a.soak:,} requests at {a.soak_clients} clients, 10% bad input (incl. a 16-bit decode bomb "
              f"and a malformed DDS); statuses {codes_total}; p50 {pct(lats, 50):.1f} ms, p99 {pct(lats, 99):.1f} ms")
        print("| point | RSS MiB |\n|---|---|")
        for name, r in rss:
            print(f"| {name} | {r:.0f} |")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
