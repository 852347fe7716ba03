"""The out-of-core linear probe against the in-memory one on the same store, and streaming training's
peak memory on a store larger than its budget.

Accuracy (same store, same copies, report half of validation; seeds of the streaming head's shuffles):
    .venv/bin/python bench/bench_streaming.py accuracy --store runs/study/block5.zarr --copies 0 2 --seeds 0 1 2
Peak RSS of `convcache train` with --memory-budget on a store of >= 4 GB (real rows tiled; built once):
    .venv/bin/python bench/bench_streaming.py memory --store runs/study/block5.zarr --big runs/bench/big.zarr \
        --gigabytes 4.2 --budget 1GB
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np

from convcache.runtime import cpu_model


def accuracy(args) -> None:
    from convcache.train.runner import train_head

    for k in args.copies:
        exact = train_head(args.store, "logreg", "/tmp/bench-stream-exact", copies=k, export=False)
        for seed in args.seeds:
            s = train_head(args.store, "logreg-stream", "/tmp/bench-stream", copies=k, export=False,
                           params={"seed": seed}, memory_budget=1)
            a, b = np.array(exact["report_correct"]), np.array(s["report_correct"])
            se = float(np.std(b - a, ddof=1) / np.sqrt(len(a)))  # paired: same report images
            print(json.dumps({"copies": k, "seed": seed, "rows": s["rows"]["train"],
                              "in_memory": round(100 * a.mean(), 2), "streaming": round(100 * b.mean(), 2),
                              "diff_points": round(100 * (b.mean() - a.mean()), 2), "paired_se_points": round(100 * se, 2),
                              "in_memory_C": exact["selection"]["C"], "streaming_C": s["selection"]["C"],
                              "streaming_epoch": s["selection"]["best_epoch"], "fit_s": round(s["fit_seconds"], 1),
                              "in_memory_fit_s": round(exact["fit_seconds"], 1), "cpu": cpu_model()}), flush=True)


def build_big(src: str, dst: str, gigabytes: float) -> None:
    """A store of >= `gigabytes` of train features: the real train rows tiled (each tile re-keyed as
    its own copies, so every row stays unique), validation copied as is."""
    import zarr

    from convcache.store import FeatureStore

    store = FeatureStore(src)
    root = zarr.open_group(dst, mode="w")
    root.attrs.update(dict(store.root.attrs))
    for split in store.splits:
        g, n = store.root[split], store.rows(split)
        row_bytes = int(np.prod(g["features"].shape[1:])) * g["features"].dtype.itemsize
        tiles = max(1, int(np.ceil(gigabytes * 1e9 / (n * row_bytes)))) if split == "train" else 1
        out = root.create_group(split, attributes={**dict(g.attrs), "committed_rows": n * tiles})
        for name in ("features", "label", "image", "copy", "sha256", "path"):
            a = g[name]
            o = out.create_array(name, shape=(n * tiles, *a.shape[1:]), chunks=a.chunks, dtype=a.dtype,
                                 dimension_names=a.metadata.dimension_names)
            for t in range(tiles):
                for s in range(0, n, 4096):
                    e = min(s + 4096, n)
                    v = a[s:e]
                    if name == "copy":
                        v = v + t * (int(g["copy"][:n].max()) + 1)
                    o[t * n + s : t * n + e] = v
        # digests: recompute per chunk-sized block so the big store verifies like a real one
        from convcache.store.integrity import block_digest, create_digest_arrays

        arrays = create_digest_arrays(out, 0)
        chunk = out["features"].chunks[0]
        starts = list(range(0, n * tiles, chunk))
        arrays["block_start"].resize((len(starts),))
        arrays["block_sha256"].resize((len(starts), 32))
        arrays["block_start"][:] = np.array(starts)
        digests = np.zeros((len(starts), 32), np.uint8)
        for i, s in enumerate(starts):
            cols = {name: out[name][s : s + chunk] for name in ("features", "label", "image", "copy", "sha256", "path")}
            digests[i] = np.frombuffer(block_digest(cols, out["features"].dtype), np.uint8)
        arrays["block_sha256"][:] = digests
        print(json.dumps({"split": split, "rows": n * tiles, "gigabytes": round(n * tiles * row_bytes / 1e9, 2)}),
              flush=True)


def memory(args) -> None:
    if args.build:
        build_big(args.store, args.big, args.gigabytes)
    for label, extra in (("streaming", ["--memory-budget", args.budget]),):
        t = time.perf_counter()
        cmd = [sys.executable, "-m", "convcache", "train", "--features", args.big, "-o", "/tmp/bench-big-head", "-q",
               *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # MiB, the largest child so far
        metrics = json.load(open("/tmp/bench-big-head/metrics.json")) if proc.returncode == 0 else {}
        print(json.dumps({"run": label, "rc": proc.returncode, "wall_s": round(wall, 1), "peak_rss_mib": round(peak),
                          "rows": metrics.get("rows"), "report": metrics.get("report", {}).get("accuracy"),
                          "stderr": proc.stderr[-300:], "cpu": cpu_model()}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("accuracy")
    a.add_argument("--store", required=True)
    a.add_argument("--copies", type=int, nargs="+", default=[0])
    a.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    m = sub.add_parser("memory")
    m.add_argument("--store", required=True)
    m.add_argument("--big", required=True)
    m.add_argument("--gigabytes", type=float, default=4.2)
    m.add_argument("--budget", default="1GB")
    m.add_argument("--build", action="store_true")
    args = p.parse_args()
    accuracy(args) if args.cmd == "accuracy" else memory(args)


if __name__ == "__main__":
    main()
