"""extract: the configuration, the store's root and each split's writer, and the run: one engine
(convcache.extract.engine) on a local or a Dask executor."""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone

import numpy as np

from convcache import __version__, artifacts
from convcache.augment import AugmentPolicy
from convcache.datasets import discover_all
from convcache.errors import ConvcacheError
from convcache.extract.engine import (
    DECODE_IN,
    ExtractorSession,
    LocalExecutor,
    SplitJob,
    extract_split,
    store_variables,
)
from convcache.gpudecode import check_decoder, resolve_decoder
from convcache.imaging import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from convcache.location import is_url
from convcache.runtime import PROVIDER_OF, available_cores, batch_size_for, math_mode, resolve_device
from convcache.store import FeatureStore, SplitSpec, SplitWriter, open_root, writer_lock
from convcache.store.layout import zarr_version

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
    batch_size: int | None = None  # images per inference call (None: by device, `runtime.batch_size_for`)
    workers: int = field(default_factory=lambda: available_cores())  # decode/augment workers: every core
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
    rehash: bool = False  # read and hash every file, ignoring the stat cache (which is written afresh)
    decode_in: str = "auto"  # decoders in processes or threads (auto: processes for plans of 256+ images)
    decode_cache_mb: float = 1024  # decoded images kept for their later copies (each image decoded once per run)
    exact: bool = False  # CUDA: TF32 off (parity runs); the math mode is recorded, a resume in another refused
    allow_mixed: bool = False  # extend a split whose rows were made on another provider or math mode
    precision: str = "fp32"  # fp16: an fp32 extractor run in fp16 (CUDA), recorded as the run's math mode
    io: str = "auto"  # bound: uint8 pixels through IO binding; plain: session.run on float32 (auto: bound on CUDA)
    decoder: str = "auto"  # pillow, or torchvision's batched decoder (nvJPEG on CUDA); auto: nvJPEG on CUDA

    def __post_init__(self):
        if isinstance(self.policy, (str, dict)):
            self.policy = AugmentPolicy.parse(self.policy)
        if self.augment < 0 or self.seed < 0:
            raise ConvcacheError("--augment and --seed must be >= 0")
        if (self.batch_size is not None and self.batch_size < 1) or self.workers < 1:
            raise ConvcacheError("--batch-size and --workers must be >= 1")
        check_decoder(self.decoder)
        if self.decode_in not in DECODE_IN or self.decode_cache_mb < 0:
            raise ConvcacheError(f"--decode-in: one of {', '.join(DECODE_IN)}; --decode-cache-mb >= 0")
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
    phases: dict = field(default_factory=dict)  # seconds to list, start the executor, hash, plan, run blocks; the
    # runtime's start-up beside them (session; its warm-up pass on CUDA: session_warm) and what of it the run
    # waited for before its first row (session_wait)
    files_hashed: int = 0  # files read to hash them
    files_from_stat_cache: int = 0  # files whose hash came from the stat cache (not read)
    decodes: int = 0  # images decoded (each once per run while the decode cache holds them)
    changes: dict = field(default_factory=dict)  # split -> listing changes since the last run (store.listing)
    math: str = ""  # the session's math mode (fp32, tf32, fp16): recorded in the run log
    batch_size: int = 0  # images per inference call (chosen by device unless given)
    decode_in: str = ""  # where images were decoded: threads or processes (this machine), "" on Dask
    decoder: str = "pillow"  # what decoded them: pillow, nvjpeg or torchvision-cpu (`gpudecode.resolve_decoder`)
    decoded_by_decoder: int = 0  # of `decodes`, those torchvision's decoder made (the others: Pillow)

    @property
    def rows_per_second(self) -> float:
        return self.rows_written / self.seconds if self.seconds else 0.0


def run_extract(cfg: ExtractConfig) -> ExtractSummary:
    start = time.perf_counter()
    distributed = bool(cfg.scheduler or cfg.cluster)
    session = proto = None
    decoder = "pillow"
    if distributed:  # the client needs the model's contract and bytes, not a session
        if cfg.precision != "fp32":
            raise ConvcacheError("--precision fp16 runs on this machine's GPU, not on a Dask cluster")
        resolve_decoder(cfg.decoder, None)  # (torchvision refused there)
        proto = artifacts.load_model(cfg.model)
        contract = artifacts.Extractor.from_proto(proto, str(cfg.model))
        if cfg.batch_size is None:
            cfg = replace(cfg, batch_size=batch_size_for(""))
    else:
        # The runtime starts up in the background, beside discovery and hashing (CUDA adds the GPU's set-up, and
        # there a first pass at the run's batch size: kernels loaded, memory grown); the split waits for it before
        # its first row and before recording its device, and its error, if any, is raised there
        where = resolve_device(cfg.device)
        decoder = resolve_decoder(cfg.decoder, where, held_decoders(cfg) if cfg.decoder == "auto" and
                                  where == "cuda" else frozenset())  # (it starts beside the hashing: the executor)
        if cfg.batch_size is None:  # a copy: the caller's config is not changed
            cfg = replace(cfg, batch_size=batch_size_for(PROVIDER_OF[where]))
        session = ExtractorSession(cfg.model, where, cfg.threads, exact=cfg.exact, precision=cfg.precision,
                                   io=cfg.io, background=True, warm_batch=cfg.batch_size if where == "cuda" else 0)
        contract = session.contract
    try:
        summary, executor = _run(cfg, session, contract, proto, decoder)
    finally:
        if session is not None:
            session.settle()
    if session is not None:  # the runtime's start-up (in the background), and what of it the first batch waited
        summary.phases.update(session=session.create_seconds, session_warm=session.warm_seconds,
                              session_wait=session.waited_seconds)
    summary.seconds = time.perf_counter() - start
    summary.decodes = getattr(executor, "decodes", 0)
    described = executor.describe() if session is not None else {}
    summary.decode_in = described.get("decode_in", "")
    summary.decoded_by_decoder = described.get("decoded_by_decoder", 0)
    return summary


def _run(cfg: ExtractConfig, session, contract, proto, decoder: str = "pillow"):
    """`run_extract` once the extractor is read: with `session` (this machine), or on Dask (`proto`)."""
    t_list = time.perf_counter()
    items, classes, ignored = discover_all(cfg.data, cfg.storage_options, progress=cfg.progress)
    listed = time.perf_counter() - t_list
    if len(classes) < 2:
        raise ConvcacheError(f"--data {cfg.data}: {len(classes)} class folder{'' if len(classes) == 1 else 's'} "
                             f"({', '.join(classes) or 'none'}); a classifier needs at least two (one folder of "
                             "photos per class)")
    if session is None:
        from convcache.extract.distributed import dask_executor

        executor = dask_executor(cfg, proto.SerializeToString(), contract)
    else:
        executor = LocalExecutor(session, cfg.workers, cfg.decode_in, int(cfg.decode_cache_mb * (1 << 20)), decoder)
    t0 = time.perf_counter()
    with executor as ex:
        math = session.math if session is not None else math_mode(ex.provider, cfg.exact, contract.precision)
        summary = ExtractSummary(provider=ex.provider, images=len(items), math=math, batch_size=cfg.batch_size,
                                 decoder=decoder, phases={"list": listed, "start": time.perf_counter() - t0})
        ex.preflight(items, cfg)  # before the lease and the store: a failure here creates nothing
        with writer_lock(cfg.output, cfg.storage_options) as guard:
            try:
                for job in split_jobs(cfg, contract, items, classes, ignored, guard):
                    extract_split(ex, job, cfg, contract, summary)
            except OSError as exc:  # disk full, read-only file system, ...: what was committed stays
                raise ConvcacheError(f"cannot write {cfg.output}: {exc.strerror or exc}; every committed row is "
                                     "kept, re-run to resume once that is fixed") from None
    return summary, executor


def held_decoders(cfg: ExtractConfig) -> set[str]:
    """The decoders of the rows the output store already holds (none when there is no store yet)."""
    try:
        return FeatureStore(cfg.output, cfg.storage_options).decoders()
    except ConvcacheError:  # no store yet (or not one: the run says so where it opens it)
        return set()


def store_identity(cfg: ExtractConfig, contract, classes) -> tuple[dict, dict]:
    """What a split's rows depend on (refused if it differs from the stored one), and its provenance."""
    identity = {"extractor_sha256": contract.identity, "policy": cfg.policy.to_dict(), "seed": cfg.seed,
                "dtype": cfg.dtype, "classes": classes}
    provenance = {"extractor": {"metadata": contract.metadata, "sha256": contract.identity, "file": str(cfg.model)},
                  "augment": {"policy": cfg.policy.to_dict(), "seed": cfg.seed, "splits": list(cfg.augment_splits)},
                  "classes": classes, "versions": _versions(), "created": _now()}
    return identity, provenance


def split_jobs(cfg: ExtractConfig, contract, items, classes, ignored, guard=None):
    """Each split of the data, in order, as a `SplitJob` (its items, the copies it gets, its SplitWriter, the
    entries discovery ignored in it)."""
    root = open_root(cfg.output, classes, cfg.storage_options, {"created": _now(), "versions": _versions()})
    if guard is not None and hasattr(guard, "fence"):
        guard.fence(root)  # the fencing token every commit of this run carries
    identity, provenance = store_identity(cfg, contract, classes)
    for split in sorted({i.split for i in items}):
        copies = list(range(cfg.augment + 1)) if split in cfg.augment_splits else [0]
        spec = SplitSpec(identity, provenance, contract.feature_shape, cfg.dtype, cfg.chunk_rows,
                         variables=store_variables(contract) if contract.taps else None)
        writer = SplitWriter(root, split, spec, cfg.output, cfg.storage_options, repair=cfg.repair, guard=guard)
        if is_url(cfg.output):  # each refresh is a GET per array and a PUT: at most every few seconds
            writer.consolidate_seconds = REMOTE_CONSOLIDATE_SECONDS
        yield SplitJob(split, [i for i in items if i.split == split], copies, writer,
                       {p: r for p, sp, r in ignored if sp == split})


def _versions() -> dict:
    import onnxruntime

    return {"convcache": __version__, "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
            "zarr": zarr_version(), "numpy": np.__version__}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
