"""extract on a Dask cluster: the client plans and commits, the workers decode, augment, infer and
write whole feature chunks.

1. The client lists the images and opens the store (its SplitWriter truncates whatever a killed run
   left past `committed_rows`, and knows which (sha256, copy) rows are committed).
2. Probe tasks on the workers hash every file and decode it once, so the plan knows which files are
   usable *before* rows are assigned (a task fills whole chunks; a row cannot go missing later).
3. The client plans the missing rows in the single-process order (same image indices), grows the
   columns to hold them, and cuts the rows into tasks at chunk boundaries: no two tasks write the
   same chunk. The model travels once to each worker (scattered bytes); each worker keeps one ONNX
   Runtime session per model (CUDA where the worker has a GPU, as in the single-process path).
4. Each task writes its feature chunks and returns the block's digest (over every column). The
   client commits blocks strictly in row order, as each contiguous prefix finishes: small columns,
   digest, then `committed_rows`. A lost worker's tasks are rerun by the scheduler (they rewrite the
   same chunks with the same bytes); a killed client leaves a committed prefix that a re-run extends.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
import time
from contextlib import contextmanager

import numpy as np
from tqdm import tqdm

from convcache.datasets import Item
from convcache.errors import ConvcacheError
from convcache.imaging import printable_path

log = logging.getLogger(__name__)

PROBE_BATCH = 64  # files per probe task
CONSOLIDATE_SECONDS = 5.0  # the client refreshes the consolidated snapshot at most this often (and at the end)
_SESSIONS: dict = {}  # per worker process: (model identity, device, threads) -> ONNX Runtime session


def parse_cluster(spec: str) -> int:
    """`local:N` -> N worker processes."""
    kind, _, n = str(spec).partition(":")
    if kind != "local" or not n.isdigit() or int(n) < 1:
        raise ConvcacheError(f"--cluster {spec}: expected local:N (N worker processes), e.g. local:2")
    return int(n)


@contextmanager
def dask_client(scheduler: str | None, cluster: str | None, threads: int | None = None):
    """A distributed.Client on an existing scheduler, or on a LocalCluster started for this run."""
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        raise ConvcacheError("distributed extraction needs dask.distributed: pip install 'convcache[dist]'") from None
    if scheduler and cluster:
        raise ConvcacheError("--scheduler and --cluster are exclusive: connect to a cluster or start a local one")
    if cluster:
        n = parse_cluster(cluster)
        with LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0",
                          silence_logs=logging.ERROR) as lc, Client(lc) as client:
            yield client
        return
    try:
        client = Client(scheduler)  # waits distributed.comm.timeouts.connect (dask config; default 30 s)
    except Exception as exc:  # OSError / TimeoutError: nothing listens there
        raise ConvcacheError(f"--scheduler {scheduler}: cannot connect ({exc.__class__.__name__}: {exc})") from None
    try:
        yield client
    finally:
        client.close()


# ---------------------------------------------------------------- on the workers

def probe_files(items: list[Item], size: int, max_pixels: int, max_bytes: int, storage_options: dict) -> list:
    from convcache.extract.mapper import probe_file

    return [probe_file(item, size, max_pixels, max_bytes, storage_options) for item in items]


def _session(model: bytes, contract, device: str, threads: int | None):
    key = (contract.identity, device, threads)
    if key not in _SESSIONS:
        from convcache.runtime import create_session

        _SESSIONS[key] = create_session(model, device, threads)
    return _SESSIONS[key]


def extract_block(model: bytes, spec: dict) -> dict:
    """Decode, augment and infer rows [start, stop) of one split; write their feature chunks; return
    the block's digest. Idempotent: a rerun writes the same bytes to the same chunks."""
    import zarr

    from convcache.extract.mapper import decode_copies
    from convcache.extract.writer import row_columns
    from convcache.integrity import block_digest
    from convcache.location import resolve

    t0 = time.perf_counter()
    contract = spec["contract"]
    session = _session(model, contract, spec["device"], spec["threads"])
    rows = spec["rows"]
    pixels = []
    i = 0
    while i < len(rows):  # one decode per image: its copies are consecutive rows
        j = i
        while j < len(rows) and rows[j]["sha256"] == rows[i]["sha256"]:
            j += 1
        r = rows[i]
        decoded = decode_copies(Item(r["source"], r["label"], spec["split"]), r["sha256"],
                                [rows[k]["copy"] for k in range(i, j)], contract.size, spec["policy"], spec["seed"],
                                spec["max_pixels"], spec["max_bytes"], spec["storage_options"])
        if decoded.error:  # it decoded when probed: the file changed during the run
            raise RuntimeError(f"{printable_path(r['source'])}: {decoded.error} (it decoded when the run was planned)")
        pixels += decoded.images
        i = j
    feats, calls = [], 0
    for b in range(0, len(pixels), spec["batch_size"]):
        batch = np.stack(pixels[b : b + spec["batch_size"]]).astype(np.float32)
        feats.append(session.run([contract.output_name], {contract.input_name: batch})[0])
        calls += 1
    features = np.concatenate(feats).astype(spec["dtype"])
    loc = resolve(spec["store"], spec["storage_options"])
    array = zarr.open_array(store=loc.zarr_store(), path=f"{spec['split']}/features", mode="r+")
    array[spec["start"] : spec["stop"]] = features
    digest = block_digest({"features": features, **row_columns(rows)}, features.dtype)
    return {"start": spec["start"], "stop": spec["stop"], "digest": digest, "calls": calls,
            "seconds": time.perf_counter() - t0, "provider": session.get_providers()[0],
            "worker": os.getpid()}


# ---------------------------------------------------------------- on the client

def row_blocks(plan, image_index: dict, start: int, rows_per_task: int):
    """The planned rows as (first row, rows) blocks cut at multiples of rows_per_task (itself a multiple
    of the chunk size), so every task writes whole chunks except where the split begins or ends
    mid-chunk. New images get indices in plan order, as in the single-process path."""
    next_image = max(image_index.values(), default=-1) + 1
    block, a = [], start
    end = (start // rows_per_task + 1) * rows_per_task
    for item, sha, need in plan:
        if sha not in image_index:
            image_index[sha] = next_image
            next_image += 1
        for c in need:
            block.append({"source": item.path, "label": item.label, "image": image_index[sha], "copy": c,
                          "sha256": sha, "path": printable_path(item.path)})
            if a + len(block) == end:
                yield a, block
                block, a, end = [], end, end + rows_per_task
    if block:
        yield a, block


def extract_split_distributed(client, model_future, split, items, copies, writer, contract, cfg, summary,
                              ignored, rows_per_task: int | None, threads: int | None) -> None:
    from dask.distributed import as_completed

    from convcache.extract.runner import plan_rows
    from convcache.extract.writer import row_columns
    from convcache.runtime import cpu_model

    t_start = time.perf_counter()
    done, image_index = writer.begin_run(ignored)
    batches = [items[i : i + PROBE_BATCH] for i in range(0, len(items), PROBE_BATCH)]
    probe = client.map(probe_files, batches, size=contract.size, max_pixels=cfg.max_pixels, max_bytes=cfg.max_bytes,
                       storage_options=cfg.storage_options, pure=False)
    hashed_all = [h for part in client.gather(probe) for h in part]
    summary.phases["probe"] = summary.phases.get("probe", 0.0) + time.perf_counter() - t_start
    plan = plan_rows(hashed_all, copies, done, writer, summary)
    decode_errors = {h.item.path: h.decode_error for h in hashed_all if h.decode_error}
    for item, _, _ in plan:
        if item.path in decode_errors:
            writer.skip(item.path, decode_errors[item.path])
    plan = [p for p in plan if p[0].path not in decode_errors]
    start = writer.committed
    total = sum(len(need) for _, _, need in plan)
    writer.reserve(total)
    writer.consolidate_seconds = max(writer.consolidate_seconds, CONSOLIDATE_SECONDS)
    per_task = max(1, -(-(rows_per_task or writer.chunk_rows) // writer.chunk_rows)) * writer.chunk_rows
    common = {"contract": contract, "device": cfg.device, "threads": threads, "split": split,
              "policy": cfg.policy, "seed": cfg.seed, "max_pixels": cfg.max_pixels, "max_bytes": cfg.max_bytes,
              "storage_options": cfg.storage_options, "batch_size": cfg.batch_size, "dtype": cfg.dtype,
              "store": cfg.output}
    # blocks are built as they are submitted, and dropped once committed: the client never holds every
    # row of a large split, only those of the tasks in flight
    pending_blocks = row_blocks(plan, image_index, start, per_task)
    in_flight = max(8, 4 * sum(w.get("nthreads", 1) for w in client.scheduler_info().get("workers", {}).values()))
    blocks, n_tasks = {}, 0

    def submit(n):
        nonlocal n_tasks
        out = []
        for a, block in itertools.islice(pending_blocks, n):
            blocks[a] = block
            out.append(client.submit(extract_block, model_future, {**common, "start": a, "stop": a + len(block),
                                                                   "rows": block}, pure=False, retries=2))
        n_tasks += len(out)
        return out

    bar = tqdm(total=total, desc=f"extract {split}", unit="row", disable=not cfg.progress or not total)
    t_tasks = time.perf_counter()
    finished, failed, providers, task_seconds = {}, [], set(), []
    running = as_completed(submit(in_flight))
    for batch in running.batches():  # every task finished since the last commit
        for fut in batch:
            try:
                res = fut.result()
            except Exception as exc:  # after the scheduler's retries: this block stays uncommitted
                failed.append(f"{exc}")
                continue
            finished[res["start"]] = res
            providers.add(res["provider"])
            task_seconds.append(res["seconds"])
            summary.inference_calls += res["calls"]
            bar.update(res["stop"] - res["start"])
        ready, at = [], writer.committed
        while at in finished:  # the contiguous finished prefix, committed at once, in row order
            r = finished.pop(at)
            ready.append((r["start"], r["stop"], row_columns(blocks.pop(r["start"])), r["digest"]))
            at = r["stop"]
        if ready:
            writer.commit_blocks(ready)
            summary.rows_written += at - ready[0][0]
        if not failed:  # after a failure nothing past it could commit: let the rest drain
            for fut in submit(len(batch)):
                running.add(fut)
    bar.close()
    summary.phases["tasks"] = summary.phases.get("tasks", 0.0) + time.perf_counter() - t_tasks
    writer.commit()
    summary.skipped.update(writer.skipped)
    summary.provider = ", ".join(sorted(providers)) or summary.provider
    if failed:
        raise ConvcacheError(f"'{split}': {len(failed)} of {n_tasks} tasks failed (first: {failed[0]}); rows "
                             f"0..{writer.committed - 1} are committed, re-run to extract the rest")
    written = writer.committed - start
    if written:
        workers = client.scheduler_info().get("workers", {})
        writer.record_run({"rows": written, "seconds": round(time.perf_counter() - t_start, 3),
                           "provider": summary.provider, "cpu": cpu_model(), "batch_size": cfg.batch_size,
                           "workers": len(workers), "scheduler": client.scheduler.address, "tasks": n_tasks,
                           "task_seconds_mean": round(float(np.mean(task_seconds)), 3) if task_seconds else None,
                           "copies": copies, "finished": _now()})


def run_distributed(cfg, contract, model_bytes: bytes, items, classes, ignored, summary, guard=None) -> None:
    from convcache.extract.runner import split_writers

    # local:N shares this machine's cores between N workers; a remote worker uses its own machine
    threads = cfg.threads or (max(1, (os.cpu_count() or 1) // parse_cluster(cfg.cluster)) if cfg.cluster else None)
    t0 = time.perf_counter()
    with dask_client(cfg.scheduler, cfg.cluster) as client:
        summary.phases["cluster"] = time.perf_counter() - t0
        if cfg.progress:
            print(f"dask: {len(client.scheduler_info().get('workers', {}))} workers, dashboard "
                  f"{client.dashboard_link}", file=sys.stderr)
        model_future = client.scatter(model_bytes, broadcast=True, hash=False)
        for split, split_items, copies, writer, ignored_here in split_writers(cfg, contract, items, classes, ignored, guard):
            extract_split_distributed(client, model_future, split, split_items, copies, writer, contract, cfg,
                                      summary, ignored_here, cfg.rows_per_task, threads)


def _now() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="seconds")
