"""The HTTP service under load on loopback (an asyncio httpx client), against the bare Predictor
rate on the same images, in one run; cache-hit latency; RSS over 10,000 requests with 10% bad input.

    .venv/bin/convcache bench serve --model runs/model.onnx --data ../shared/data/cats_and_dogs_small
"""

from __future__ import annotations

import argparse
import asyncio
import io
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


async def load(url: str, bodies: list[bytes], concurrency: int, n: int) -> tuple[float, list[float], dict]:
    latencies, codes = [], {}
    counter = iter(range(n))

    async def worker(client):
        for i in counter:
            t = time.perf_counter()
            r = await client.post(url + "/v1/predict", content=bodies[i % len(bodies)])
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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="convcache bench serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="runs/model.onnx")
    p.add_argument("--data", default="../shared/data/cats_and_dogs_small")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--soak", type=int, default=10_000)
    p.add_argument("--soak-clients", type=int, default=32)
    a = p.parse_args(argv)
    files = sorted((Path(a.data) / "validation").rglob("*.jpg"))[:: 1000 // a.images][: a.images]
    bodies = [f.read_bytes() for f in files]

    predictor = Predictor(a.model, "cpu")
    predictor.predict(bodies[:8])
    t = time.perf_counter()
    predictor.predict(bodies)
    bare = len(bodies) / (time.perf_counter() - t)
    del predictor

    print(f"bare Predictor (decode + batch-32 inference), {len(bodies)} images: {bare:.1f} img/s\n")
    print("| clients | requests | img/s | vs bare Predictor | p50 ms | p99 ms | statuses |")
    print("|---|---|---|---|---|---|---|")
    server = Server(a.model, "--cache-mb", "0", "--max-batch", "32", "--max-wait-ms", "5")
    try:
        asyncio.run(load(server.url, bodies[:4], 1, 4))  # warm-up
        for c in (1, 4, 16):
            n = max(2 * len(bodies), 8 * c) if c > 1 else len(bodies)
            rate, lat, codes = asyncio.run(load(server.url, bodies, c, n))
            print(f"| {c} | {n} | {rate:.1f} | {rate / bare:.2f}x | {pct(lat, 50):.0f} | {pct(lat, 99):.0f} "
                  f"| {codes} |")
    finally:
        server.stop()

    server = Server(a.model, "--cache-mb", "256")
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
