"""The out-of-core linear probe against the in-memory one on the same store, and streaming training's
peak memory on a store larger than its budget.

Accuracy (same store, same copies, report half of validation; seeds of the streaming head's shuffles):
    .venv/bin/python experiments/bench_streaming.py accuracy --store runs/study/block5.zarr --copies 0 2 --seeds 0 1 2
Peak RSS of `convcache train` with --memory-budget on a store of >= 4 GB (real rows tiled; built once):
    .venv/bin/python experiments/bench_streaming.py memory --store runs/study/block5.zarr --big runs/experiments/big.zarr \
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
    its own copies, so every row stays unique), validation copied as is. Written through the store's own
    writer, block by block, so the big store verifies like a real one."""
    from convcache.store import FeatureStore, SplitSpec, SplitWriter, open_root
    from convcache.store.integrity import block_digest

    store = FeatureStore(src)
    root = open_root(dst, store.classes, provenance={k: v for k, v in store.root.attrs.items()
                                                     if k not in ("format", "classes", "writer_fence")})
    for split in store.splits:
        attrs, n = store.attrs(split), store.rows(split)
        spec = SplitSpec(attrs["identity"], {k: attrs[k] for k in ("extractor", "augment") if k in attrs},
                         store.feature_shape(split), store.dtype(split))
        writer = SplitWriter(root, split, spec, dst)
        row_bytes = int(np.prod(spec.feature_shape)) * np.dtype(spec.dtype).itemsize
        tiles = max(1, int(np.ceil(gigabytes * 1e9 / (n * row_bytes)))) if split == "train" else 1
        copies = store.copies_available(split) + 1
        for t in range(tiles):
            for part in store.iter_blocks(split):
                cols = {"label": part.label, "image": part.image, "copy": part.copy + t * copies,
                        "sha256": np.frombuffer(bytes.fromhex("".join(part.sha256)), np.uint8).reshape(-1, 32),
                        "path": np.array(part.path, dtype=object)}
                start = writer.committed
                writer.write(start, part.features)
                writer.commit_blocks([(start, start + len(part), cols,
                                       block_digest({"features": part.features, **cols}, part.features.dtype))])
        writer.commit()
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
