"""Prototype of the store's two candidate commit layers on the distributed write path, measured on the
same workload: today's protocol (workers write whole chunks of a pre-sized Zarr array; the client
alone advances `committed_rows` over the finished prefix and refreshes consolidated metadata) and
Icechunk transactions (workers write through forked sessions; the client merges finished forks and
commits a snapshot). Only the commit layer differs: the features are synthetic (a seeded function of
the row), so nothing but storage is measured, and any row can be checked after the fact.

    .venv/bin/python experiments/archive/commit_layers.py all --tasks 48 --rows 128 --features 8192 > runs/experiments/commit_layers.jsonl

Measured: write throughput and per-commit latency on local disk and on an S3 endpoint (moto's server on
loopback); kill -9 of the client at random points (does every reader see only valid committed rows,
and does a re-run finish?); two clients writing different rows to one store at once; and what a
plain reader (zarr for today's protocol, icechunk's read-only session for Icechunk) sees mid-run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import zarr

from convcache.runtime import cpu_model


def rows_of(start: int, stop: int, nfeat: int, salt: int = 0) -> np.ndarray:
    """The synthetic features of rows [start, stop): row r is constant (r + 1 + salt * 1e6) / 7."""
    return np.repeat(((np.arange(start, stop) + 1 + salt * 1_000_000) / 7).astype(np.float32)[:, None], nfeat, 1)


def valid_prefix(arr, committed: int, nfeat: int, salt: int = 0) -> bool:
    if committed == 0:
        return True
    got = arr[:committed, :2]
    return bool(np.array_equal(got, rows_of(0, committed, 2, salt)))


# ------------------------------------------------------------------ today's protocol (committed_rows)

def zarr_store(url: str):
    from convcache.location import resolve

    return resolve(url).zarr_store()


def zarr_task(url, start, stop, nfeat, salt):
    arr = zarr.open_array(store=zarr_store(url), path="features", mode="r+")
    arr[start:stop] = rows_of(start, stop, nfeat, salt)
    return start, stop


def run_zarr(client, url, tasks, rows, nfeat, salt=0, commit_every=1, on_commit=None):
    import warnings

    from dask.distributed import as_completed

    store = zarr_store(url)
    root = zarr.open_group(store=store, mode="a", use_consolidated=False)
    if "features" not in root:
        root.create_array("features", shape=(0, nfeat), chunks=(rows, nfeat), dtype="float32")
        root.attrs["committed_rows"] = 0
    committed = int(root.attrs["committed_rows"])
    total = tasks * rows
    arr = root["features"]
    arr.resize((total, nfeat))  # reserve: the shape runs ahead of the commit
    futs = [client.submit(zarr_task, url, a, a + rows, nfeat, salt, pure=False)
            for a in range(committed, total, rows)]
    done, latencies, pending = set(), [], 0
    for fut in as_completed(futs):
        a, b = fut.result()
        done.add(a)
        new = committed
        while new in done:
            new += rows
        pending += 1
        if new > committed and (pending >= commit_every or new == total):
            t = time.perf_counter()
            root.attrs["committed_rows"] = new
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                zarr.consolidate_metadata(store)
            latencies.append(time.perf_counter() - t)
            committed, pending = new, 0
            if on_commit:
                on_commit(committed)
    return latencies


def read_zarr(url, nfeat, salt=0) -> dict:
    root = zarr.open_group(store=zarr_store(url), mode="r")
    committed = int(root.attrs.get("committed_rows", 0))
    arr = root["features"]
    return {"committed": committed, "shape_rows": arr.shape[0], "valid": valid_prefix(arr, committed, nfeat, salt)}


# ------------------------------------------------------------------ Icechunk transactions

def ic_storage(url: str):
    import icechunk as ic

    ic.set_logs_filter("error")  # its local-storage warning, printed per repository opened, is noted in the doc

    if url.startswith("s3://"):
        bucket, _, prefix = url[5:].partition("/")
        return ic.s3_storage(bucket=bucket, prefix=prefix, endpoint_url=os.environ["AWS_ENDPOINT_URL"],
                             allow_http=True, region="us-east-1", access_key_id="testing",
                             secret_access_key="testing", force_path_style=True)
    return ic.local_filesystem_storage(url)


def ic_task(fork, start, stop, nfeat, salt):
    arr = zarr.open_array(store=fork.store, path="features", mode="r+")
    arr[start:stop] = rows_of(start, stop, nfeat, salt)
    return fork, start


def run_icechunk(client, url, tasks, rows, nfeat, salt=0, commit_every=1, on_commit=None):
    import icechunk as ic
    from dask.distributed import as_completed

    repo = ic.Repository.open_or_create(ic_storage(url))
    total = tasks * rows
    s = repo.writable_session("main")
    root = zarr.open_group(store=s.store, mode="a")
    if "features" not in root:
        root.create_array("features", shape=(total, nfeat), chunks=(rows, nfeat), dtype="float32")
        root.attrs["committed_rows"] = 0
        s.commit("reserve rows")  # a fork needs a clean session: the shape is committed before the data
        s = repo.writable_session("main")
    committed = int(zarr.open_group(store=s.store, mode="r").attrs["committed_rows"])
    base = s.fork()
    futs = [client.submit(ic_task, base, a, a + rows, nfeat, salt, pure=False) for a in range(committed, total, rows)]
    done, latencies, forks, new = {}, [], [], committed  # new: the end of the contiguous finished prefix
    for fut in as_completed(futs):
        fork, a = fut.result()
        done[a] = fork
        while new in done:
            forks.append(done.pop(new))
            new += rows
        if new > committed and (len(forks) >= commit_every or new == total):
            t = time.perf_counter()
            s = repo.writable_session("main")
            s.merge(*forks)
            zarr.open_group(store=s.store, mode="a").attrs["committed_rows"] = new
            s.commit(f"rows {committed}..{new}")
            latencies.append(time.perf_counter() - t)
            committed, forks = new, []
            if on_commit:
                on_commit(committed)
    return latencies


def read_icechunk(url, nfeat, salt=0) -> dict:
    import icechunk as ic

    repo = ic.Repository.open(ic_storage(url))
    s = repo.readonly_session("main")
    root = zarr.open_group(store=s.store, mode="r")
    committed = int(root.attrs.get("committed_rows", 0))
    arr = root["features"]
    return {"committed": committed, "shape_rows": arr.shape[0], "valid": valid_prefix(arr, committed, nfeat, salt)}


LAYERS = {"committed_rows": (run_zarr, read_zarr), "icechunk": (run_icechunk, read_icechunk)}


# ------------------------------------------------------------------ experiments

def cluster():
    import logging

    from dask.distributed import Client, LocalCluster

    lc = LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0", silence_logs=logging.CRITICAL)
    return lc, Client(lc)


def throughput(args, where: str, base: str) -> None:
    lc, client = cluster()
    try:
        for rep in range(args.repeats):
            for layer, (run, read) in LAYERS.items():
                for every in (1, 8):
                    url = f"{base}/{layer}-{every}-{rep}" + ("" if base.startswith("s3://") else ".store")
                    seen = []
                    t = time.perf_counter()
                    lat = run(client, url, args.tasks, args.rows, args.features, commit_every=every,
                              on_commit=seen.append)
                    wall = time.perf_counter() - t
                    mib = args.tasks * args.rows * args.features * 4 / 2**20
                    state = read(url, args.features)
                    print(json.dumps({"exp": "throughput", "where": where, "layer": layer, "commit_every_tasks": every,
                                      "rep": rep, "MiB": round(mib), "wall_s": round(wall, 2),
                                      "MiB_per_s": round(mib / wall, 1), "commits": len(lat),
                                      "commit_ms_first": round(1000 * lat[0], 1),
                                      "commit_ms_last": round(1000 * lat[-1], 1),
                                      "commit_ms_median": round(1000 * float(np.median(lat)), 1),
                                      "final": state, "cpu": cpu_model()}), flush=True)
    finally:
        client.close()
        lc.close()


def mid_run_reader(args, base: str) -> None:
    """A reader polls while the writer runs: what does it see?"""
    lc, client = cluster()
    try:
        for layer, (run, read) in LAYERS.items():
            url = f"{base}/reader-{layer}.store"
            obs, stop = [], threading.Event()

            def poll():
                while not stop.is_set():
                    try:
                        obs.append(read(url, args.features))
                    except Exception as exc:  # not created yet, or unreadable mid-write
                        obs.append({"error": exc.__class__.__name__})
                    time.sleep(0.02)

            th = threading.Thread(target=poll)
            th.start()
            run(client, url, args.tasks, args.rows, args.features)
            stop.set()
            th.join()
            ok = [o for o in obs if "error" not in o]
            print(json.dumps({"exp": "reader mid-run", "layer": layer, "observations": len(obs),
                              "errors": len(obs) - len(ok),
                              "saw_rows_past_commit": sum(o["shape_rows"] > o["committed"] for o in ok),
                              "saw_invalid_committed_rows": sum(not o["valid"] for o in ok)}), flush=True)
    finally:
        client.close()
        lc.close()


def kill_child(args) -> None:
    """Child process: one writer run (killed from outside)."""
    lc, client = cluster()
    LAYERS[args.layer][0](client, args.url, args.tasks, args.rows, args.features, salt=args.salt)
    client.close()
    lc.close()


def _spawn(args, layer, url, salt=0):
    cmd = [sys.executable, __file__, "child", "--layer", layer, "--url", url, "--tasks", str(args.tasks), "--rows",
           str(args.rows), "--features", str(args.features), "--salt", str(salt)]
    return subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def kills(args, base: str) -> None:
    rng = random.Random(0)
    for layer, (run, read) in LAYERS.items():
        results, total = [], args.tasks * args.rows
        for k in range(args.kills):
            url = f"{base}/kill-{layer}-{k}" + ("" if base.startswith("s3://") else ".store")
            p = _spawn(args, layer, url)
            target = rng.uniform(0.05, 0.9) * args.tasks * args.rows  # kill once this many rows are committed
            deadline = time.time() + 120
            while time.time() < deadline and p.poll() is None:
                try:
                    if read(url, args.features)["committed"] >= target:
                        break
                except Exception:  # not created yet
                    pass
                time.sleep(0.002)
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            try:
                before = read(url, args.features)
            except Exception as exc:
                before = {"error": exc.__class__.__name__, "committed": 0, "valid": True}
            p = _spawn(args, layer, url)  # resume
            p.wait()
            after = read(url, args.features)
            results.append({"killed_at_committed": before.get("committed"), "valid_after_kill": before.get("valid"),
                            "resumed_complete": after["committed"] == args.tasks * args.rows and after["valid"],
                            "rc": p.returncode, **({"error": before["error"]} if "error" in before else {})})
        print(json.dumps({"exp": "kill -9 client", "where": base.split(":")[0] if "://" in base else "local",
                          "layer": layer, "kills": len(results),
                          "killed_mid_run": sum(0 < (r["killed_at_committed"] or 0) < total for r in results),
                          "valid_after_every_kill": all(r["valid_after_kill"] for r in results),
                          "resumed_complete": sum(r["resumed_complete"] for r in results), "points": results}),
              flush=True)


def two_writers(args, base: str) -> None:
    """Two clients write *different* rows (salt 1 and 2) into one store at once."""
    for layer, (run, read) in LAYERS.items():
        url = f"{base}/two-{layer}" + ("" if base.startswith("s3://") else ".store")
        a, b = _spawn(args, layer, url, salt=1), _spawn(args, layer, url, salt=2)
        a.wait()
        b.wait()
        try:
            s1, s2 = read(url, args.features, salt=1), read(url, args.features, salt=2)
            outcome = {"rc": [a.returncode, b.returncode], "committed": s1["committed"],
                       "all_rows_from_writer_1": s1["valid"], "all_rows_from_writer_2": s2["valid"]}
        except Exception as exc:
            outcome = {"rc": [a.returncode, b.returncode], "read_error": f"{exc.__class__.__name__}: {exc}"[:200]}
        outcome["consistent"] = bool(outcome.get("all_rows_from_writer_1") or outcome.get("all_rows_from_writer_2"))
        print(json.dumps({"exp": "two writers", "where": base.split(":")[0] if "://" in base else "local",
                          "layer": layer, **outcome}), flush=True)


def with_s3():
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://{host}:{port}")
    boto3.client("s3").create_bucket(Bucket="layers")
    return server


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("exp", choices=["all", "throughput", "reader", "kills", "two", "child"])
    p.add_argument("--tasks", type=int, default=48)
    p.add_argument("--rows", type=int, default=128)
    p.add_argument("--features", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--kills", type=int, default=5)
    p.add_argument("--layer", choices=list(LAYERS))
    p.add_argument("--url")
    p.add_argument("--salt", type=int, default=0)
    args = p.parse_args()
    if args.exp == "child":
        return kill_child(args)
    tmp = tempfile.mkdtemp(prefix="layers-")
    try:
        if args.exp in ("all", "throughput"):
            throughput(args, "local disk", tmp)
            server = with_s3()
            try:
                throughput(args, "s3 (moto, loopback)", "s3://layers/tp")
                if args.exp == "all":
                    two_writers(args, "s3://layers/two")
            finally:
                server.stop()
        if args.exp in ("all", "reader"):
            mid_run_reader(args, tmp)
        if args.exp in ("all", "kills"):
            kills(args, tmp)
            server = with_s3()
            try:
                kills(args, "s3://layers/kills")
            finally:
                server.stop()
        if args.exp == "two":
            server = with_s3()
            try:
                two_writers(args, "s3://layers/two")
            finally:
                server.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
