"""extract: plan what is missing from the cache, decode and augment in worker threads, infer in
batches on the main thread (ONNX Runtime releases the GIL, so the two overlap), write blocks."""

from __future__ import annotations

import itertools
import logging
import platform
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import zarr
from tqdm import tqdm

from convcache import __version__
from convcache.augment import AugmentPolicy
from convcache.errors import ConvcacheError
from convcache.extract.mapper import decode_copies, hash_file
from convcache.datasets import discover_all
from convcache.artifacts import STORE_FORMAT as FORMAT
from convcache.extract.locking import writer_lock
from convcache.location import is_url
from convcache.extract.writer import SplitWriter
from convcache.imaging import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, printable_path
from convcache import artifacts
from convcache.onnxmeta import load_model
from convcache.runtime import cpu_model, create_session

log = logging.getLogger(__name__)
REMOTE_CONSOLIDATE_SECONDS = 5.0  # object storage: the consolidated snapshot is refreshed at most this often


@dataclass
class ExtractConfig:
    model: str
    data: str
    output: str
    augment: int = 0
    augment_splits: tuple = ("train",)
    seed: int = 0
    batch_size: int = 32
    workers: int = 2
    device: str = "auto"
    dtype: str = "float32"
    policy: AugmentPolicy = field(default_factory=AugmentPolicy)
    max_pixels: int = DEFAULT_MAX_PIXELS
    chunk_rows: int | None = None
    progress: bool = True
    max_bytes: int = DEFAULT_MAX_BYTES
    repair: bool = False  # recompute damaged rows instead of refusing a damaged store
    storage_options: dict = field(default_factory=dict)  # for -o and --data URLs (beside the environment's)
    scheduler: str | None = None  # a Dask scheduler address: extract on that cluster
    cluster: str | None = None  # local:N: start a Dask LocalCluster of N worker processes
    rows_per_task: int | None = None  # distributed: rows per task, rounded up to whole chunks (None: one chunk)
    threads: int | None = None  # ONNX Runtime threads per session (None: its default; 1 per local:N worker)

    def __post_init__(self):
        if isinstance(self.policy, (str, dict)):
            self.policy = AugmentPolicy.parse(self.policy)
        if self.augment < 0 or self.seed < 0:
            raise ConvcacheError("--augment and --seed must be >= 0")
        if self.batch_size < 1 or self.workers < 1:
            raise ConvcacheError("--batch-size and --workers must be >= 1")
        if self.max_pixels < 1 or self.max_bytes < 1 or (self.chunk_rows is not None and self.chunk_rows < 1):
            raise ConvcacheError("--max-pixels, --max-bytes and --chunk-rows must be >= 1")
        if self.dtype not in ("float32", "float16"):
            raise ConvcacheError(f"--dtype {self.dtype}: choose float32 or float16")
        if (self.rows_per_task is not None and self.rows_per_task < 1) or (self.threads is not None
                                                                             and self.threads < 1):
            raise ConvcacheError("--rows-per-task and --threads must be >= 1")
        if self.scheduler and self.cluster:
            raise ConvcacheError("--scheduler and --cluster are exclusive: connect to a cluster or start a local one")
        if self.cluster:
            from convcache.extract.distributed import parse_cluster

            parse_cluster(self.cluster)
        from convcache.location import resolve

        resolve(self.output, self.storage_options, what="-o", write=True)  # a bad URL fails before any work
        resolve(self.data, self.storage_options, what="--data")


@dataclass
class ExtractSummary:
    rows_written: int = 0
    rows_cached: int = 0
    inference_calls: int = 0
    images: int = 0
    skipped: dict = field(default_factory=dict)
    duplicates: dict = field(default_factory=dict)
    seconds: float = 0.0
    provider: str = ""
    phases: dict = field(default_factory=dict)  # distributed: seconds to start/connect, probe, run tasks

    @property
    def rows_per_second(self) -> float:
        return self.rows_written / self.seconds if self.seconds else 0.0


class Extractor:
    """An ONNX extractor and what a store needs to know about it."""

    def __init__(self, path: str, device: str, threads: int | None = None):
        self.contract = artifacts.Extractor.from_proto(load_model(path), str(path))
        self.meta = self.contract.metadata
        self.sha256 = self.contract.identity
        self.size = self.contract.size
        self.feature_shape = self.contract.feature_shape
        self.session = create_session(path, device, threads)
        self.provider = self.session.get_providers()[0]
        self.calls = 0

    def __call__(self, images: np.ndarray) -> np.ndarray:
        self.calls += 1
        return self.session.run([self.contract.output_name],
                                {self.contract.input_name: np.asarray(images, dtype=np.float32)})[0]


def run_extract(cfg: ExtractConfig) -> ExtractSummary:
    start = time.perf_counter()
    distributed = bool(cfg.scheduler or cfg.cluster)
    if distributed:  # the client needs the model's contract and bytes, not a session
        proto = load_model(cfg.model)
        extractor = artifacts.Extractor.from_proto(proto, str(cfg.model))
    else:
        extractor = Extractor(cfg.model, cfg.device, cfg.threads)
    items, classes, ignored = discover_all(cfg.data, cfg.storage_options)
    with writer_lock(cfg.output, cfg.storage_options) as guard:
        try:
            if not distributed:
                return _run_locked(cfg, start, extractor, items, classes, ignored, guard)
            from convcache.extract.distributed import run_distributed

            summary = ExtractSummary(provider="dask", images=len(items))
            run_distributed(cfg, extractor, proto.SerializeToString(), items, classes, ignored, summary, guard)
            summary.seconds = time.perf_counter() - start
            return summary
        except OSError as exc:  # disk full, read-only file system, ...: what was committed stays
            raise ConvcacheError(f"cannot write {cfg.output}: {exc.strerror or exc}; every committed row is kept, "
                                 "re-run to resume once that is fixed") from None


def store_identity(cfg: ExtractConfig, contract, classes) -> tuple[dict, dict]:
    """What a split's rows depend on (refused if it differs from the stored one), and its provenance."""
    identity = {"extractor_sha256": contract.identity, "policy": cfg.policy.to_dict(), "seed": cfg.seed,
                "dtype": cfg.dtype, "classes": classes}
    provenance = {"extractor": {"metadata": contract.metadata, "sha256": contract.identity, "file": str(cfg.model)},
                  "augment": {"policy": cfg.policy.to_dict(), "seed": cfg.seed, "splits": list(cfg.augment_splits)},
                  "classes": classes, "versions": _versions(), "created": _now()}
    return identity, provenance


def split_writers(cfg: ExtractConfig, contract, items, classes, ignored, guard=None):
    """For each split of the data, in order: (split, its items, the copies it gets, its SplitWriter,
    the entries discovery ignored in it)."""
    root = open_root(cfg.output, classes, cfg.storage_options)
    identity, provenance = store_identity(cfg, contract, classes)
    for split in sorted({i.split for i in items}):
        copies = list(range(cfg.augment + 1)) if split in cfg.augment_splits else [0]
        writer = SplitWriter(root, split, identity, provenance, contract.feature_shape, cfg.dtype, cfg.chunk_rows,
                             repair=cfg.repair, guard=guard)
        if is_url(cfg.output):  # each refresh is a GET per array and a PUT: at most every few seconds
            writer.consolidate_seconds = REMOTE_CONSOLIDATE_SECONDS
        yield split, [i for i in items if i.split == split], copies, writer, {p: r for p, sp, r in ignored
                                                                                if sp == split}


def _run_locked(cfg, start, extractor, items, classes, ignored, guard=None) -> ExtractSummary:
    summary = ExtractSummary(provider=extractor.provider, images=len(items))
    with ThreadPoolExecutor(cfg.workers) as pool:
        for split, split_items, copies, writer, ignored_here in split_writers(cfg, extractor.contract, items, classes,
                                                                              ignored, guard):
            _extract_split(split, split_items, copies, writer, extractor, pool, cfg, summary, ignored_here)
    summary.inference_calls = extractor.calls
    summary.seconds = time.perf_counter() - start
    return summary


def _extract_split(split, items, copies, writer, extractor, pool, cfg, summary, ignored=None) -> None:
    t_start = time.perf_counter()
    rows_before = summary.rows_written
    done, image_index = writer.begin_run(ignored)
    hashed_all = list(pool.map(lambda item: hash_file(item, cfg.max_bytes, cfg.storage_options), items))
    plan = plan_rows(hashed_all, copies, done, writer, summary)
    total = sum(len(need) for _, _, need in plan)
    next_image = max(image_index.values(), default=-1) + 1
    pending: list[tuple] = []  # (item, sha, copy, pixels) waiting for a full batch
    bar = tqdm(total=total, desc=f"extract {split}", unit="row", disable=not cfg.progress or total == 0)

    def write(job):
        rows, future = job
        for (item, sha, copy, _), feat in zip(rows, future.result()):
            writer.add({"features": feat, "label": item.label, "image": image_index[sha], "copy": copy,
                        "sha256": sha, "path": printable_path(item.path)})
        summary.rows_written += len(rows)
        bar.update(len(rows))

    # One batch infers in its own thread (the runtime releases the GIL) while this thread writes the
    # batch before it and gathers the next one from the decoders: rows are still written in order.
    # Batches are filled into two reused float32 buffers (alternating: the one in flight is never
    # touched): a fresh 8 MiB array per batch costs more CPU in page faults than decoding does.
    in_flight = None
    buffers = itertools.cycle([np.empty((cfg.batch_size, extractor.size, extractor.size, 3), np.float32)
                               for _ in range(2)])
    jobs = ((item, sha, need, extractor.size, cfg.policy, cfg.seed, cfg.max_pixels, cfg.max_bytes,
             cfg.storage_options) for item, sha, need in plan)
    with ThreadPoolExecutor(1, thread_name_prefix="convcache-infer") as infer_pool:
        def infer(rows):
            nonlocal in_flight
            batch = next(buffers)[: len(rows)]
            for i, r in enumerate(rows):
                batch[i] = r[3]
            job = (rows, infer_pool.submit(extractor, batch))
            if in_flight is not None:
                write(in_flight)
            in_flight = job

        for decoded in _ordered(pool, decode_copies, jobs, window=4 * cfg.workers):
            if decoded.error:
                writer.skip(decoded.item.path, decoded.error)
                continue
            if decoded.sha256 not in image_index:
                image_index[decoded.sha256] = next_image
                next_image += 1
            pending += [(decoded.item, decoded.sha256, c, px) for c, px in zip(decoded.copies, decoded.images)]
            while len(pending) >= cfg.batch_size:
                infer(pending[: cfg.batch_size])
                pending = pending[cfg.batch_size :]
        if pending:
            infer(pending)
        if in_flight is not None:
            write(in_flight)
    bar.close()
    writer.flush()
    writer.commit()
    summary.skipped.update(writer.skipped)
    rows = summary.rows_written - rows_before
    if rows:  # the cost of the cache, for compute accounting (seconds per row on this machine)
        writer.record_run({"rows": rows, "seconds": round(time.perf_counter() - t_start, 3),
                           "provider": extractor.provider, "cpu": cpu_model(), "batch_size": cfg.batch_size,
                           "workers": cfg.workers, "copies": copies, "finished": _now()})


def plan_rows(hashed_all, copies, done, writer, summary) -> list[tuple]:
    """(item, sha256, copies still needed) for every usable file, in item order. Unreadable files and
    content listed under two labels are recorded as skipped; repeated content is used once."""
    plan, seen, labels = [], {}, {}
    for hashed in hashed_all:
        if not hashed.error:
            labels.setdefault(hashed.sha256, set()).add(hashed.item.label)
    for hashed in hashed_all:
        if hashed.error:
            writer.skip(hashed.item.path, hashed.error)
        elif len(labels[hashed.sha256]) > 1:  # the same bytes under two labels: neither label can be trusted
            writer.skip(hashed.item.path, "the same content is listed under different labels")
        elif hashed.sha256 in seen:
            summary.duplicates[printable_path(hashed.item.path)] = printable_path(seen[hashed.sha256])
        else:
            seen[hashed.sha256] = hashed.item.path
            need = [c for c in copies if (hashed.sha256, c) not in done]
            summary.rows_cached += len(copies) - len(need)
            if need:
                plan.append((hashed.item, hashed.sha256, need))
    return plan


def _ordered(pool, fn, jobs, window: int):
    """pool.map with a bounded look-ahead, so decoded images never pile up in memory."""
    futures = deque()
    for job in jobs:
        futures.append(pool.submit(fn, *job))
        if len(futures) >= window:
            yield futures.popleft().result()
    while futures:
        yield futures.popleft().result()


def open_root(output: str, classes: list[str], storage_options: dict | None = None) -> zarr.Group:
    """The store's root group for writing (created if absent), checked against `classes`."""
    from convcache.location import resolve

    loc = resolve(output, storage_options, what="-o", write=True)
    try:
        if loc.exists() and not loc.child("zarr.json").isfile():
            raise ConvcacheError(f"-o {output}: exists and is not a Zarr store")
        root = zarr.open_group(store=loc.zarr_store(), mode="a", use_consolidated=False)  # the writer reads the truth
        fmt = root.attrs.get("format")
    except ConvcacheError:
        raise
    except Exception as exc:  # corrupt zarr.json and friends; credentials or network for a URL
        raise ConvcacheError(f"-o {output}: unreadable store metadata ({exc.__class__.__name__}: {exc})") from None
    if fmt is None:
        root.attrs.update({"format": FORMAT, "classes": classes, "created": _now(), "versions": _versions()})
    elif fmt != FORMAT:
        raise ConvcacheError(f"-o {output}: not a convcache feature store")
    elif list(root.attrs["classes"]) != classes:
        raise ConvcacheError(f"-o {output}: the store has classes {list(root.attrs['classes'])}, the data has "
                             f"{classes}; class indices would change. Write to a new store.")
    return root


def _versions() -> dict:
    import onnxruntime

    return {"convcache": __version__, "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
            "zarr": zarr.__version__, "numpy": np.__version__}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
