"""The extract engine: one unit of work, one planner, one committer, two executors.

A **block** (`Block`) is rows [start, stop) of one split, each row one (image, copy). Every block lives
the same life on every executor:

    rows -> decode + augment -> infer -> write its feature chunks -> digest -> commit (in row order)

1. `plan_rows` (where the store is written): hash every file (a file whose stat key matches the split's
   stat cache is not read: `convcache.store.statcache`), record what cannot be used (unreadable, the
   same bytes under two labels) and the duplicates, and list the copies each image still needs.
2. `cut_blocks`: give the rows of the images that decode their positions and image indices, **copy by
   copy** (every image's copy 0 in plan order, then every copy 1, ...: "copies 0..K" is a contiguous
   range of each run's rows, so reading them reads only their chunks), cut at multiples of the block size
   (whole chunks: no two blocks write the same chunk).
3. An executor runs the blocks and yields their results (`BlockResult`), in any order:
   - `LocalExecutor` (here): decoders in processes (threads for small plans), warps in threads, inference
     on one thread (ONNX Runtime releases the GIL), the rows streamed across blocks in batches; a block is
     written once its last row is in.
   - `DaskExecutor` (`convcache.extract.distributed`): one task per block (`run_block`); each worker's
     session comes from a `WorkerPlugin`.
4. `Committer`: commits the results strictly in row order, as each contiguous prefix completes (small
   columns, the block digests, then `committed_rows`: `SplitWriter.commit_blocks`).

A file must decode before its rows get positions (a block fills whole chunks, so a row cannot go missing
later): the local executor decodes in row order and cuts blocks from what decoded, keeping the pixels
(each image is decoded once per run, its pixels kept for its later copies within a memory budget: rows stay
copy-major, only the decodes are shared); Dask workers probe every file first (hash and decode), so the
client can plan.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from threading import Lock, Thread
from typing import NamedTuple, Protocol

import numpy as np

from convcache import artifacts
from convcache.augment import warp_threads
from convcache.datasets import Item
from convcache.errors import ImageError
from convcache.extract.mapper import (
    Base,
    DecodeSpec,
    Hashed,
    add_maps,
    decode_base,
    decode_bases,
    decode_copies,
    hash_file,
    maps_of,
    pixels_of,
    read_as_hashed,
    warp_copy,
    watch_parent,
)
from convcache.imaging import printable_path
from convcache.runtime import (
    NULL_DEVICE,
    PRECISIONS,
    PROVIDER_OF,
    BoundRunner,
    NullSession,
    create_session,
    math_mode,
    resolve_device,
    to_fp16,
    uint8_input,
)
from convcache.store import FeatureSink, statcache
from convcache.store.integrity import block_digest
from convcache.store.layout import COORDINATES
from convcache.store.listing import Changes, changes, data_location, listing_of

log = logging.getLogger(__name__)
COMMIT_ROWS = 64  # the local executor's blocks (its pipeline's unit, and a block digest each)
COMMIT_SECONDS = 1.0  # ...written and committed together once a chunk is full or this long has passed
COMMIT_COST_RATIO = 4  # ...but a full chunk waits until 4x the last commit's time has passed (commits <= ~20%)
HOLD_BYTES = 256 << 20  # ...or until this many bytes of features are held
DECODE_IN = ("auto", "threads", "processes")
DECODE_CACHE_BYTES = 1 << 30  # decoded images kept for their later copies (150 px: ~15,000 images)
PROCESS_MIN_IMAGES = 256  # "auto" decodes in processes from this many images on (starting them costs ~1 s)
PROCESS_TASK_IMAGES = 8  # images a decoding process is sent at a time
ROWS_PER_JOB = 8  # rows (decode if first, warp) a thread of the pool is given at a time
MAPS_ROWS = 256  # rows whose decodes' warp maps are computed together, in threads (K = 15: 3,840 maps a call)
READ_ONCE_BYTES = 128 << 20  # files' bytes kept from hashing to decoding, in threads (45 KB photos: ~2,900)
EARLY_DECODE_BYTES = 256 << 20  # ...or their pixels, decoded as they are hashed (150 px: ~3,900 images)
WINDOW_BYTES = 256 << 20  # decoded rows held ahead of the batcher with decoders in processes (at 150 px: 3,900)
PROCESS_MIN_WORKERS = 4  # ...and with this many workers: on 2 cores threads were faster (docs/benchmarks.md)
GPU_DECODE_IMAGES = 64  # images torchvision's decoder (nvJPEG on CUDA) takes in one batched call
GPU_READ_JOB = 16  # ...whose bytes are fetched (popped from those kept, or read) this many to a reader's job


class Row(NamedTuple):
    """One row of a split: an image's copy, as stored (`source` is where the image is read from). A named tuple:
    one is made a row, on the thread every row passes (a third of a frozen dataclass's cost)."""

    source: str
    label: int
    image: int
    copy: int
    sha256: str
    path: str


class Planned(NamedTuple):
    """An image the plan uses, with the copies it still needs (and their pixels, once decoded here), and
    its image index when the split already holds some of its copies. A named tuple, as `Row`."""

    item: Item
    sha256: str
    copies: tuple[int, ...]
    images: list | None = None
    image: int | None = None


@dataclass
class Block:
    """The unit of work: rows [start, start + len(rows)) of one split (pixels: one HxWx3 uint8 per row,
    when they were decoded before the block was cut)."""

    split: str
    start: int
    rows: list[Row]
    pixels: list | None = None

    @property
    def stop(self) -> int:
        return self.start + len(self.rows)


@dataclass(frozen=True)
class BlockSettings:
    """What every block of one split needs besides its rows (it travels with each Dask task): `sink` is where
    its features are written (the split's writer reserved the rows)."""

    sink: FeatureSink
    split: str
    decode: DecodeSpec
    input_name: str
    outputs: tuple  # the extractor's output names, in order
    variables: tuple  # the store variable each output goes to (`features`, or one per tap)
    batch_size: int
    dtype: str


@dataclass(frozen=True)
class BlockResult:
    """A block whose features are written: its digest (over every column) waits for the committer."""

    start: int
    stop: int
    digest: bytes
    calls: int = 0
    seconds: float = 0.0
    provider: str = ""
    worker: int = 0


@dataclass(frozen=True)
class BlockFailure:
    """A block that failed (after the executor's retries): nothing past it can commit in this run."""

    start: int
    error: str


def store_variables(contract) -> dict:
    """The store variables an extractor's outputs fill, name -> shape: `features` for a one-output extractor,
    one per tap (named as the tap) for a tapped one. Every tap comes from the same pass."""
    if contract.taps:
        return {t.name: tuple(t.shape) for t in contract.taps}
    return {"features": tuple(contract.feature_shape)}


IO = ("auto", "plain", "bound")


class ExtractorSession:
    """An extractor's contract (`artifacts.Extractor`) and an inference session for it, on this process.

    `precision`: fp32 runs the graph as stored; fp16 runs an fp32 extractor converted to fp16 in memory
    (`runtime.to_fp16`, the graph `export --precision fp16` stores: a GPU precision, recorded as the run's math
    mode). `io`: plain is `session.run` on a float32 batch; bound feeds uint8 pixels (a Cast in front of the
    graph: the same features, a quarter of the bytes to move) through IO binding (`runtime.BoundRunner`),
    staged by `stage` apart from `run_staged`; auto is bound on CUDA, plain elsewhere. `background`: the runtime
    starts up on a thread of its own (the contract, the provider and the math mode are known at once; the first
    `stage` or `run_staged` waits for it and raises its error); `warm_batch`: see `_make`."""

    def __init__(self, path: str, device: str, threads: int | None = None, exact: bool = False,
                 precision: str = "fp32", io: str = "auto", background: bool = False, warm_batch: int = 0):
        from convcache.errors import ConvcacheError

        if precision not in PRECISIONS or io not in IO:
            raise ConvcacheError(f"--precision: one of {', '.join(PRECISIONS)}; io: one of {', '.join(IO)}")
        self.contract = artifacts.read(path, artifacts.KIND_EXTRACTOR)
        where = resolve_device(device)
        if precision == "fp16" and self.contract.precision != "fp32":
            raise ConvcacheError(f"--precision fp16 runs an fp32 extractor in fp16; {path} is "
                                 f"{self.contract.precision} already")
        if precision == "fp16" and where in ("openvino", NULL_DEVICE):
            raise ConvcacheError(f"--precision fp16 runs on ONNX Runtime (CUDA, or the CPU), not --device {where}")
        if precision == "fp16" and where != "cuda":
            log.warning("--precision fp16 on the CPU: ONNX Runtime computes it in fp32 between fp16 roundings, "
                        "slower than fp32; fp16 is for CUDA")
        self.bound = io == "bound" or (io == "auto" and where == "cuda")
        if self.bound and where in ("openvino", NULL_DEVICE):
            raise ConvcacheError(f"io binding runs on ONNX Runtime (CUDA, or the CPU), not --device {where}")
        # The provider `where` gets, known before the runtime is up (`create_session` is given `where`, so a
        # CUDA session that would fall back to the CPU is refused there, never run under the wrong name)
        self.provider = PROVIDER_OF[where]
        self.outputs, self.variables = self.contract.output_names, list(store_variables(self.contract))
        # uint8 batches where the runtime takes them: bound IO (a Cast in the graph), and the null device, which
        # stands for the CUDA path's input pipeline (bound on CUDA: no float batch is built on the host there)
        self.input_dtype = np.uint8 if self.bound or where == NULL_DEVICE else np.float32
        self.math = math_mode(self.provider, exact, precision if precision != "fp32" else self.contract.precision)
        self.device = "cuda" if self.provider == "CUDAExecutionProvider" else "cpu"
        self.calls = 0
        # the runtime's start-up (its warm-up pass included), that pass alone, and how long the first batch waited
        self.create_seconds = self.warm_seconds = self.waited_seconds = 0.0
        self._made: Future = Future()
        args = (path, where, threads, exact, precision, warm_batch)
        if background:  # the runtime starts up beside the files' hashing (ONNX Runtime's start frees the GIL)
            Thread(target=self._make, args=args, name="convcache-session", daemon=True).start()
        else:
            self._make(*args)
            self._ready()  # its error, if any, raised here

    def _make(self, path, where, threads, exact, precision, warm_batch: int) -> None:
        """Start the runtime; with `warm_batch`, run one pass of that many zero images in it, so that what a
        runtime does on its first pass (CUDA: kernels loaded, its memory arena grown, the bound input buffers
        made) is paid here, beside the hashing, not by the first batch. The pass is not counted in `calls`."""
        t0 = time.perf_counter()
        try:
            if where == NULL_DEVICE:  # the contract has the outputs' shapes: no model to load
                session = NullSession(shapes=dict(zip(self.contract.output_names,
                                                      store_variables(self.contract).values())))
            else:
                source = path
                if precision == "fp16" or self.bound:
                    proto = artifacts.load_model(path)
                    proto = to_fp16(proto) if precision == "fp16" else proto
                    source = (uint8_input(proto) if self.bound else proto).SerializeToString()
                session = create_session(source, where, threads, exact=exact)
            runner = BoundRunner(session, session.get_inputs()[0].name, self.outputs, self.device) \
                if self.bound else None
            if warm_batch:
                t1, side = time.perf_counter(), self.contract.size
                zeros = np.zeros((warm_batch, side, side, 3), self.input_dtype)
                runner(zeros) if runner is not None else session.run(self.outputs, {self.contract.input_name: zeros})
                self.warm_seconds = time.perf_counter() - t1
        except BaseException as exc:  # raised where the session is first used
            self.create_seconds = time.perf_counter() - t0
            self._made.set_exception(exc)
        else:
            self.create_seconds = time.perf_counter() - t0
            self._made.set_result((session, runner))

    def _ready(self):
        """(the runtime session, its IO-binding runner or None), waiting for a background start-up to end."""
        if not self._made.done():
            t0 = time.perf_counter()
            try:
                self._made.exception()
            finally:
                self.waited_seconds += time.perf_counter() - t0
        return self._made.result()

    @property
    def session(self):
        """The runtime's session (ONNX Runtime's, OpenVINO's or the null one): waited for if it is starting."""
        return self._ready()[0]

    def ready(self) -> None:
        """Wait for the runtime's start-up to end; its error, if any, raised here."""
        self._ready()

    def settle(self) -> None:
        """Wait for a background start-up to end, its error (a run that needed no batch never saw it) dropped:
        a runtime never starts up while the interpreter exits."""
        self._made.exception()

    def stage(self, images: np.ndarray):
        """A batch made ready to run (bound: on the session's device; plain: float32)."""
        runner = self._ready()[1]
        if runner is not None:
            return runner.stage(np.asarray(images, self.input_dtype))
        return np.asarray(images, dtype=self.input_dtype)

    def run_staged(self, staged) -> dict:
        """One pass over a staged batch: store variable -> its features."""
        self.calls += 1
        session, runner = self._ready()
        if runner is not None:
            return dict(zip(self.variables, runner.run(staged)))
        return dict(zip(self.variables, session.run(self.outputs, {self.contract.input_name: staged})))

    def __call__(self, images: np.ndarray) -> dict:
        """One pass: store variable -> its features."""
        return self.run_staged(self.stage(images))


# ---------------------------------------------------------------- plan

def plan_rows(hashed_all: list[Hashed], copies, committed, writer, summary) -> list[Planned]:
    """The images to extract, in item order, each with the copies it still needs (`committed`: the split's
    `Committed` rows). Unreadable files and content listed under two labels are recorded as skipped;
    repeated content is used once."""
    plan, seen, labels = [], {}, {}
    for hashed in hashed_all:  # each content's label, or -1 once two labels claim it (ints: no set per file)
        if not hashed.error:
            label = labels.setdefault(hashed.sha256, hashed.item.label)
            if label != hashed.item.label:
                labels[hashed.sha256] = -1
    first = []
    for hashed in hashed_all:
        if hashed.error:
            writer.skip(hashed.item.path, hashed.error)
        elif labels[hashed.sha256] == -1:  # the same bytes under two labels: neither label can be trusted
            writer.skip(hashed.item.path, "the same content is listed under different labels")
        elif hashed.sha256 in seen:
            summary.duplicates[printable_path(hashed.item.path)] = printable_path(seen[hashed.sha256])
        else:
            seen[hashed.sha256] = hashed.item.path
            first.append(hashed)
    del labels, seen
    masks, images = committed.lookup([h.sha256 for h in first])
    for hashed, mask, image in zip(first, masks, images):
        need = tuple(c for c in copies if not mask >> c & 1)
        summary.rows_cached += len(copies) - len(need)
        if need:
            plan.append(Planned(hashed.item, hashed.sha256, need, image=image))
    return plan


def copy_major(plan: list[Planned]) -> Iterator[tuple[Planned, int]]:
    """(image, copy) in row order: every planned image's lowest copy in plan order, then the next copy..."""
    for c in sorted({c for p in plan for c in p.copies}):
        for p in plan:
            if c in p.copies:
                yield p, c


def cut_blocks(split: str, usable: Iterable[Planned], next_image: int, start: int,
               block_rows: int) -> Iterator[Block]:
    """The usable images' rows as blocks cut at multiples of `block_rows` (a multiple of the chunk size for
    Dask, so a task writes whole chunks; 64 rows for the local executor, which writes several blocks at
    once). New images get indices in plan order. Blocks are cut as they are pulled: nothing holds every
    row of a large split."""
    image_index: dict[str, int] = {}  # new images' indices, from `next_image` on, as they first appear
    rows, pixels, a = [], [], start
    end = (start // block_rows + 1) * block_rows
    for p in usable:
        image = p.image
        if image is None:
            image = image_index.get(p.sha256)
            if image is None:
                image = image_index[p.sha256] = next_image
                next_image += 1
        for i, c in enumerate(p.copies):
            rows.append(Row(p.item.path, p.item.label, image, c, p.sha256, printable_path(p.item.path)))
            pixels.append(p.images[i] if p.images is not None else None)
            if a + len(rows) == end:
                yield _block(split, a, rows, pixels)
                rows, pixels, a, end = [], [], end, end + block_rows
    if rows:
        yield _block(split, a, rows, pixels)


def _block(split, start, rows, pixels) -> Block:
    return Block(split, start, rows, pixels if all(p is not None for p in pixels) else None)


def row_columns(rows: list[Row]) -> dict:
    """A block's small columns (everything but features) as stored."""
    return {
        "label": np.array([r.label for r in rows], np.int32),
        "image": np.array([r.image for r in rows], np.int64),
        "copy": np.array([r.copy for r in rows], np.int16),
        "sha256": np.frombuffer(bytes.fromhex("".join(r.sha256 for r in rows)), np.uint8).reshape(len(rows), 32),
        "path": np.array([r.path for r in rows], dtype=object),
    }


def digest(rows: list[Row], features: dict) -> bytes:
    """A block's digest over every column (`convcache.store.integrity`): its feature variables, then the rest."""
    dtype = next(iter(features.values())).dtype
    return block_digest({**features, **row_columns(rows)}, dtype, [*features, *COORDINATES])


# ---------------------------------------------------------------- one block, start to end (a Dask task)

def decode_block(block: Block, s: BlockSettings) -> list:
    """One HxWx3 uint8 array per row; each image is decoded once (its copies are consecutive rows)."""
    if block.pixels is not None:
        return block.pixels
    rows, pixels, i = block.rows, [], 0
    while i < len(rows):
        j = i
        while j < len(rows) and rows[j].sha256 == rows[i].sha256:
            j += 1
        r = rows[i]
        decoded = decode_copies(Item(r.source, r.label, block.split), r.sha256, [rows[k].copy for k in range(i, j)],
                                s.decode)
        if decoded.error:  # it decoded when the run was planned: the file changed during the run
            raise RuntimeError(f"{r.path}: {decoded.error} (it decoded when the run was planned)")
        pixels += decoded.images
        i = j
    return pixels


def infer(run, pixels: list, s: BlockSettings) -> tuple[dict, int]:
    """Features of `pixels` (variable -> array) in batches of `s.batch_size`, in the store's dtype; and the
    inference calls."""
    feats = [run(np.stack(pixels[b : b + s.batch_size]).astype(np.float32))
             for b in range(0, len(pixels), s.batch_size)]
    return {v: np.concatenate([f[v] for f in feats]).astype(s.dtype) for v in s.variables}, len(feats)


def run_block(session, block: Block, s: BlockSettings) -> BlockResult:
    """Decode, augment and infer one block, write its feature chunks into the store, return its digest.
    Idempotent: a rerun writes the same bytes to the same chunks."""
    t0 = time.perf_counter()
    features, calls = infer(lambda x: dict(zip(s.variables, session.run(list(s.outputs), {s.input_name: x}))),
                            decode_block(block, s), s)
    s.sink.write(block.start, features)
    return BlockResult(block.start, block.stop, digest(block.rows, features), calls, time.perf_counter() - t0,
                       session.get_providers()[0], os.getpid())


# ---------------------------------------------------------------- commit

class Committer:
    """Commits finished blocks strictly in row order, each contiguous finished prefix in one commit.
    `track` registers the blocks as they are cut (their small columns are written at commit time)."""

    def __init__(self, writer):
        self.writer = writer
        self._rows: dict[int, list[Row]] = {}
        self._finished: dict[int, BlockResult] = {}

    def track(self, blocks: Iterable[Block]) -> Iterator[Block]:
        for block in blocks:
            self._rows[block.start] = block.rows
            yield block

    def add(self, results: Iterable[BlockResult]) -> int:
        """Commit what the finished results complete; returns the rows committed now."""
        for r in results:
            self._finished[r.start] = r
        ready, at = [], self.writer.committed
        while at in self._finished:
            r = self._finished.pop(at)
            ready.append((r.start, r.stop, row_columns(self._rows.pop(r.start)), r.digest))
            at = r.stop
        if not ready:
            return 0
        self.writer.commit_blocks(ready)
        return at - ready[0][0]


# ---------------------------------------------------------------- the local executor

class Executor(Protocol):
    """Where blocks run: `LocalExecutor` (threads on this machine) or `DaskExecutor` (a cluster). The engine
    calls nothing else of an executor. Their lifetime is the runner's: `with LocalExecutor(...)`, or
    `with dask_executor(...)` (which owns the cluster's client)."""

    provider: str

    def describe(self) -> dict:
        """What a run's record says about where it ran (workers, tasks, ...)."""

    def preflight(self, items: list[Item], cfg) -> None:
        """Checks before the store is touched (a cluster that cannot read the images fails here)."""

    def ready(self) -> None:
        """Wait until rows can be inferred (a local runtime starting up in the background), raising why not: called
        before the run's device is recorded and its first row is made."""

    def block_rows(self, writer) -> int:
        """Rows per block (whole chunks for Dask: no two tasks write one chunk)."""

    def reserve(self, writer, rows: int) -> None:
        """Grow the split ahead of time where workers write into it (Dask); nothing locally."""

    def hash_files(self, items: list[Item], cfg, bar=None, early=None) -> list[Hashed]:
        """Every item's content hash, in item order. `early`: (DecodeSpec, needed(sha256) -> bool), to decode
        the files whose rows are still needed as they are hashed, where the executor can (`LocalExecutor`)."""

    def usable(self, plan: list[Planned], writer, settings: BlockSettings) -> Iterator[Planned]:
        """The planned images that decode, in plan order (the others recorded as skipped)."""

    def run(self, blocks: Iterable[Block], settings: BlockSettings, writer) -> Iterator[list]:
        """Run the blocks; yield lists of BlockResult / BlockFailure as they finish, in any order."""


@dataclass
class _Open:
    block: Block
    features: dict  # variable -> rows x shape
    filled: int = 0
    calls: int = 0
    t0: float = field(default_factory=time.perf_counter)
    digest: object = None  # the block digest's future, once the block is complete


class _Decode:
    """One image's decode (`mapper.decode_base`): run by the first thread that asks for it (`call`, once: the
    copies of one image may be warped by two threads at once), or in a worker process as one of a `_Group`."""

    __slots__ = ("_call", "_lock", "_base", "_group", "_future", "_index", "_args", "counted", "matrices")

    def __init__(self, call=None, group: _Group | None = None, args: tuple = ()):
        self._call, self._base, self._group, self._future, self._index = call, None, group, None, 0
        self._args, self.counted = args, False
        self.matrices = None  # the copies' warp maps, when computed before the decode (`LocalExecutor._usable`)
        self._lock = Lock() if group is None else None

    def get(self):
        if self._group is not None:
            from concurrent.futures.process import BrokenProcessPool

            self._group.submitted(self)
            try:
                return self._future.result()[self._index]
            except BrokenProcessPool:  # a decoding process died with this image's task in flight
                return self._group.alone(self)
        with self._lock:
            if self._base is None:
                self._base, self._call = self._call(), None
            return self._base


class _Batched:
    """Images gathered `per_task` to a task: a group is sent (`_send`, under the lock) when it is full or as soon as a
    thread needs one of its images (`submitted`). `_Group` sends to decoding processes, `_GpuGroup` to the GPU
    decoder's thread."""

    def __init__(self, executor: LocalExecutor, spec: DecodeSpec, per_task: int):
        self._executor, self._spec, self._per_task = executor, spec, per_task
        self._lock, self._open = Lock(), []

    def start(self, p: Planned, copies: tuple) -> _Decode:
        pending = _Decode(group=self, args=(p.item, p.sha256, copies))
        with self._lock:
            self._open.append(pending)
            if len(self._open) >= self._per_task:
                self._send()
        return pending

    def submitted(self, pending: _Decode) -> None:
        with self._lock:
            if pending._future is None:
                self._send()

    def _send(self) -> None:
        raise NotImplementedError


class _Group(_Batched):
    """Decodes for worker processes, `per_task` images to a task (`mapper.decode_bases`): one task an image
    cost the extracting process more than decoding did (a future, a wake-up of the pool's manager thread, a
    message each way: at K = 0, 777 µs of its CPU a row on 2 cores). A group is sent when it is full or as soon
    as a thread needs one of its images.

    A decoding process that dies (a decoder crash, the OOM killer) breaks the pool and fails every task in
    flight: the pool is replaced, and each image of those tasks is decoded again alone, in a process of its own,
    so that the one that kills its decoder is skipped with that reason and the run goes on."""

    def _send(self) -> None:  # under the lock
        from concurrent.futures.process import BrokenProcessPool

        group, self._open = self._open, []
        images = [pending._args for pending in group]
        procs = self._executor._procs
        try:
            future = procs.submit(decode_bases, images, self._spec)
        except BrokenProcessPool:  # broken since the last task: a new pool
            future = self._executor._restart_processes(procs).submit(decode_bases, images, self._spec)
        for k, pending in enumerate(group):
            pending._future, pending._index = future, k

    def alone(self, pending: _Decode) -> Base:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        from concurrent.futures.process import BrokenProcessPool

        self._executor._restart_processes(None)
        item, sha256, copies = pending._args
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("forkserver"), initializer=watch_parent,
                                 initargs=(os.getpid(),)) as one:
            try:
                return one.submit(decode_base, item, sha256, self._spec, copies).result()
            except BrokenProcessPool:
                return Base(None, {}, "its decoding process died (a decoder crash, or killed for memory)")


class _GpuGroup(_Batched):
    """Decodes with torchvision's batched decoder (`gpudecode.TorchDecoder`: nvJPEG on CUDA), `per_task` images a
    call, on the executor's decoder thread: sent when full or as soon as a thread needs one of its images (as
    `_Group`). Each image's bytes are those hashed in this run where they were kept, else read again (and refused
    if they no longer hash so), by the executor's readers as the group is sent. An image the decoder does not
    take (not a plain JPEG, corrupt, or a call that failed) is decoded by Pillow on that thread, which records why
    one that does not decode at all is skipped: this path loses no file that Pillow decodes."""

    def _send(self) -> None:  # under the lock
        group, self._open = self._open, []
        images = [pending._args for pending in group]
        ex = self._executor  # the bytes read by the executor's readers meanwhile (a read frees the GIL), 16 a job
        reads = [ex._read_pool.submit(lambda part: [self._bytes(item, sha256) for item, sha256, _ in part],
                                      images[i : i + GPU_READ_JOB]) for i in range(0, len(images), GPU_READ_JOB)]
        future = ex._gpu_pool.submit(self._task, images, reads)
        for k, pending in enumerate(group):
            pending._future, pending._index = future, k

    def _bytes(self, item: Item, sha256: str) -> tuple[bytes | None, Base | None]:
        """The bytes hashed in this run where they were kept, else read (and refused if they no longer hash so);
        or the Base that says why there are none."""
        data = self._executor._bytes_of_content(item, sha256)
        try:
            return (read_as_hashed(item, sha256, self._spec) if data is None else data), None
        except ImageError as exc:
            return None, Base(None, {}, exc.reason)
        except Exception as exc:  # one bad file never stops a run
            return None, Base(None, {}, f"failed ({exc.__class__.__name__}: {exc})")

    def _task(self, images: list[tuple], reads: list) -> list[Base]:
        spec = self._spec
        decoder = self._executor._torch_decoder.result()  # started with the executor (ready() raised its error)
        datas, bases = zip(*(got for r in reads for got in r.result())) if reads else ((), ())
        bases = list(bases)
        todo = [k for k, base in enumerate(bases) if base is None]
        try:
            pixels = decoder.decode([datas[k] for k in todo], spec.size, spec.max_pixels)
        except Exception as exc:  # the decoder itself failed (out of GPU memory, ...): Pillow decodes them
            log.warning("%s failed on %d images (%s: %s); Pillow decodes them", decoder.name, len(todo),
                        exc.__class__.__name__, exc)
            pixels = [None] * len(todo)
        for k, px in zip(todo, pixels):
            item, sha256, _ = images[k]
            bases[k] = Base(px, {}) if px is not None else decode_base(item, sha256, spec, (), datas[k], {})
        add_maps([(base, sha256, copies) for base, (_, sha256, copies) in zip(bases, images)], spec)
        return bases



class LocalExecutor:
    """Blocks on this machine: decoding and augmentation in `workers` threads (bounded look-ahead),
    inference of one batch on its own thread while this one gathers the next batch, blocks written as
    they complete. Batches span block boundaries, so every call but the last is a full batch."""

    def __init__(self, session: ExtractorSession, workers: int, decode_in: str = "auto",
                 cache_bytes: int = DECODE_CACHE_BYTES, decoder: str = "pillow"):
        if decode_in not in DECODE_IN:
            raise ValueError(f"decode_in {decode_in!r}: one of {', '.join(DECODE_IN)}")
        self.session = session
        self.provider = session.provider
        self.workers = workers
        self.decode_in, self.cache_bytes = decode_in, cache_bytes
        self.decodes = 0  # images decoded (one file read + decode each) in this executor's life
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="convcache-decode")
        self._infer_pool = ThreadPoolExecutor(1, thread_name_prefix="convcache-infer")
        self._stage_pool = ThreadPoolExecutor(1, thread_name_prefix="convcache-stage")
        self._digest_pool = ThreadPoolExecutor(1, thread_name_prefix="convcache-digest")
        self._procs = None  # decoders in processes, started on the first plan that is worth them
        self._warm: list = []  # the current pool's start-up tasks, one a process
        self._procs_lock = Lock()
        self._warp_threads = warp_threads(1)  # one warp per pool thread: OpenCV's own pool only costs CPU here
        self.read_once_bytes = READ_ONCE_BYTES
        self._read: dict = {}  # path -> (sha256, bytes hashed): read once, decoded from these (`hash_files`)
        self._read_held, self._read_lock = 0, Lock()
        self.early_bytes = min(EARLY_DECODE_BYTES, cache_bytes)  # decoded pixels held: the decode cache's budget
        self._early: dict = {}  # sha256 -> pixels decoded as the file was hashed (None: being decoded)
        self._early_held, self._early_spec = 0, None
        # torchvision's decoder (`gpudecode.resolve_decoder`: nvjpeg, torchvision-cpu), started now on a thread of
        # its own (importing torch and starting CUDA take seconds), beside the hashing; its decodes run there too
        self.decoder, self._gpu_pool, self._torch_decoder = decoder, None, None
        if decoder != "pillow":
            from convcache.gpudecode import TorchDecoder, decoder_device

            self._gpu_pool = ThreadPoolExecutor(1, thread_name_prefix="convcache-gpu-decode")
            self._read_pool = ThreadPoolExecutor(workers, thread_name_prefix="convcache-gpu-read")
            self._torch_decoder = self._gpu_pool.submit(TorchDecoder, decoder_device(decoder))

    def close(self) -> None:
        self._forget_bytes()
        self._pool.shutdown(cancel_futures=True)
        self._infer_pool.shutdown(cancel_futures=True)
        self._stage_pool.shutdown(cancel_futures=True)
        self._digest_pool.shutdown(cancel_futures=True)
        if self._gpu_pool is not None:
            self._gpu_pool.shutdown(cancel_futures=True)
            self._read_pool.shutdown(cancel_futures=True)
        if self._procs is not None:
            self._procs.shutdown(cancel_futures=True)
        warp_threads(self._warp_threads)  # OpenCV's setting as it was
        self._warp_threads = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def ready(self) -> None:
        self.session.ready()
        if self._torch_decoder is not None:
            from convcache.errors import ConvcacheError

            try:
                self._torch_decoder.result()
            except Exception as exc:
                raise ConvcacheError(f"--decoder: torchvision's decoder ({self.decoder}) could not start "
                                     f"({exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                                     "--decoder pillow decodes on the CPU") from None

    def describe(self) -> dict:
        out = {"workers": self.workers, "decode_in": "processes" if self._procs is not None else "threads",
               "decodes": self.decodes, "decoder": self.decoder}
        if self._torch_decoder is not None and self._torch_decoder.done() and not self._torch_decoder.exception():
            out["decoded_by_decoder"] = self._torch_decoder.result().decoded  # the rest: by Pillow
        return out

    def preflight(self, items: list[Item], cfg) -> None:
        """Nothing to check (this process reads the images itself). Decoding processes a run of this size would
        use are started now, so that they come up while the files are hashed (~0.2 s for 2 of them here)."""
        if self._wants_processes(len(items)):
            self._start_processes()

    def _wants_processes(self, images: int) -> bool:
        return self._torch_decoder is None and self.workers > 1 and (self.decode_in == "processes" or (
            self.decode_in == "auto" and images >= PROCESS_MIN_IMAGES and self.workers >= PROCESS_MIN_WORKERS))

    def _restart_processes(self, broken):
        """The decoding pool, replaced if it is broken (or is `broken`): once, whichever thread finds it first."""
        with self._procs_lock:
            procs = self._procs
            if procs is broken or getattr(procs, "_broken", False):
                log.warning("a decoding process died: its pool is replaced, and the images it had in flight are "
                            "decoded again, each in a process of its own")
                procs.shutdown(wait=False, cancel_futures=True)
                self._procs = self._new_pool()  # swapped whole: other threads never see no pool
            return self._procs

    def _start_processes(self) -> None:
        if self._procs is None:
            self._procs = self._new_pool()

    def _new_pool(self):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # forkserver: never fork this process, whose runtime threads hold locks
        procs = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("forkserver"),
                                    initializer=watch_parent, initargs=(os.getpid(),))
        # each process started, its imports done, without waiting for them (`_check_started` waits)
        self._warm = [procs.submit(decode_bases, [], None) for _ in range(self.workers)]
        return procs

    def _check_started(self) -> None:
        """Before the first image is sent: the decoding processes came up. A process that cannot even start (a
        script that runs convcache at its top level, without `if __name__ == "__main__":`, is imported again by
        each new process, which then fails) would otherwise break pool after pool, each image then decoded, and
        lost, in a process of its own: minutes of respawns for nothing."""
        from concurrent.futures import wait
        from concurrent.futures.process import BrokenProcessPool

        from convcache.errors import ConvcacheError

        done, _ = wait(self._warm)
        if not any(f.exception() is None for f in done):
            exc = next(f.exception() for f in done)
            why = ("each exited as it started; a Python script that runs convcache must guard its top level with "
                   "`if __name__ == \"__main__\":` (each new process imports it)" if isinstance(exc, BrokenProcessPool)
                   else f"{exc.__class__.__name__}: {exc}")
            raise ConvcacheError(f"the decoding processes could not start ({why}); or decode in threads "
                                 "(--decode-in threads)")

    commit_seconds = COMMIT_SECONDS

    def block_rows(self, writer) -> int:
        """Small blocks (COMMIT_ROWS) through the pipeline; finished blocks are written and committed
        together when they fill a chunk or `commit_seconds` has passed (see `run`): a chunk is rewritten
        about once a second at most, never once per block, and an interrupt loses about a second of work
        whatever the chunk size."""
        return min(writer.chunk_rows, COMMIT_ROWS)

    def reserve(self, writer, rows: int) -> None:
        """Nothing ahead of time: each block grows the arrays to its own end (`SplitWriter.write`)."""

    def hash_files(self, items: list[Item], cfg, bar=None, early=None) -> list[Hashed]:
        """Every item's hash, in item order, read and hashed by the pool's threads (both release the GIL).
        Local files go 16 to a job: one future a file cost more than reading and hashing a 45 KB photo
        (~50 µs); a URL is a job of its own, so object-storage latency overlaps."""
        per_job = 1 if items and "://" in str(items[0].path) else 16  # one data root: all URLs or none
        # Read once: with decoders in threads, the bytes hashed are kept (the first `read_once_bytes` of them, in
        # item order, as rows are planned) and decoded from there: neither read nor hashed again (~65 µs a 45 KB
        # photo here, a GET on object storage). Worker processes read the files themselves: sending them the
        # bytes would cost the extracting process more than a read costs theirs.
        # Decoded early: with `early`, a file whose rows are still needed is decoded by the thread that hashed it,
        # its bytes just read (`_decode_early`): two threads hashing keep ~1.4 of 2 cores busy (GIL hand-offs
        # around short reads and hashes), and the store's set-up after hashing runs on one; a decode there
        # fills them (K = 0, 2,000 photos: 1.06x the rows a second, docs/benchmarks.md).
        self._early_spec = early if self._procs is None and self._torch_decoder is None and self.early_bytes > 0 \
            else None
        keep = self._keep if self._procs is None and (self.read_once_bytes > 0 or self._early_spec) else None
        if bar is not None and self._early_spec is not None and getattr(bar, "desc", "").startswith("hash "):
            bar.set_description("hash and decode " + bar.desc[len("hash "):])  # the bar's time is mostly decoding

        def some(chunk):
            return [hash_file(item, cfg.max_bytes, cfg.storage_options, keep) for item in chunk]

        out = []
        try:
            for chunk in _ordered(self._pool, some, _chunks(items, per_job),
                                  window=max(4, 16 // per_job) * self.workers):
                out += chunk
                if bar is not None:
                    bar.update(len(chunk))
        finally:
            self._early_spec = None
        return out

    def _keep(self, item: Item, sha256: str, data: bytes) -> None:
        if self._early_spec is not None and self._decode_early(sha256, data, *self._early_spec):
            return
        with self._read_lock:
            if self._read_held + len(data) <= self.read_once_bytes:
                self._read[item.path] = (sha256, data)
                self._read_held += len(data)

    def _decode_early(self, sha256: str, data: bytes, spec: DecodeSpec, needed) -> bool:
        """Decode `data` (just hashed to `sha256`) now, if its content's rows are still `needed` and its pixels fit
        `early_bytes`; whether its pixels are (or are being) held, by content: a second file of the same content
        is not decoded again. One that does not decode is left to the rows' phase, which records why."""
        if not needed(sha256):
            return False
        size = spec.size * spec.size * 3  # model-size uint8 pixels: every decode's size
        with self._read_lock:
            if sha256 in self._early:
                return True
            if self._early_held + size > self.early_bytes:
                return False
            self._early[sha256], self._early_held = None, self._early_held + size  # this thread decodes it
        try:
            pixels = pixels_of(data, spec)
        except Exception:  # (an ImageError, or anything a decoder raises): decoded again, and recorded, later
            pixels = None
        with self._read_lock:
            if pixels is None:
                del self._early[sha256]
                self._early_held -= size
            else:
                self._early[sha256] = pixels
        return pixels is not None

    def _pixels_of(self, p: Planned):
        """The pixels `p`'s content was decoded to as it was hashed (then forgotten), or None."""
        with self._read_lock:
            pixels = self._early.pop(p.sha256, None)
            if pixels is not None:
                self._early_held -= pixels.nbytes
        return pixels

    def _bytes_of(self, p: Planned) -> bytes | None:
        """The bytes hashed for `p` in this run (then forgotten), or None: the decode reads the file."""
        return self._bytes_of_content(p.item, p.sha256)

    def _bytes_of_content(self, item: Item, sha256: str) -> bytes | None:
        with self._read_lock:
            got = self._read.pop(item.path, None)
            if got is None:
                return None
            self._read_held -= len(got[1])
        return got[1] if got[0] == sha256 else None

    def _forget_bytes(self) -> None:
        with self._read_lock:  # pixels decoded early and never asked for were decodes all the same
            self.decodes += sum(1 for pixels in self._early.values() if pixels is not None)
            self._read, self._read_held, self._early, self._early_held = {}, 0, {}, 0

    def usable(self, plan: list[Planned], writer, s: BlockSettings) -> Iterator[Planned]:
        try:
            yield from self._usable(plan, writer, s)
        finally:  # bytes of images not planned (rows already committed, duplicates) go too
            self._forget_bytes()

    def _usable(self, plan: list[Planned], writer, s: BlockSettings) -> Iterator[Planned]:
        """Each planned (image, copy) that decodes, with its pixels, copy by copy (`copy_major`); an image
        that does not decode is skipped (and not tried again for its other copies).

        **Each image is decoded once per run**: its decoded pixels are kept, from its first copy to its last,
        while they fit `cache_bytes` (in plan order: with copy-major rows every kept image is reused K times,
        so keeping the first that fit is the best a cache can do); its other copies are warps of them. Images
        past the budget are decoded again for each copy. Decoding runs in worker processes for plans large
        enough to pay for starting them (`decode_in`), warps in threads (OpenCV releases the GIL).

        Decodes are started here, in row order, as the look-ahead window admits their first copy: in
        processes they run ahead of the threads that warp them (a thread waiting on its own process's
        decode left that process idle for each round trip: at K = 0 processes ran at half of threads' rate
        on 2 cores); in threads the first copy to need them decodes them, unless the pass that hashed the file
        did (`_decode_early`)."""
        start = self._decoder(plan, s)
        maps_here = self._procs is None and self._torch_decoder is None
        # in threads, the warp maps of the copies each decode serves are computed before it, MAPS_ROWS rows'
        # worth at once (`maps_of`: ~4 µs a copy at K = 15, against ~50 for one image's 15 in its decode, all of
        # it numpy under the GIL); decoding processes compute theirs, a task's images at once
        ahead = MAPS_ROWS if maps_here else 1
        failed: set = set()
        remaining = {p.sha256: len(p.copies) for p in plan}  # copies still to come, per image
        kept: dict = {}  # sha256 -> _Decode, while more copies of it are to come
        size = s.decode.size * s.decode.size * 3  # model-size uint8 pixels: every decode's size
        held = [0]

        def jobs():
            rows = copy_major(plan)
            while chunk := list(itertools.islice(rows, ahead)):
                out, started = [], []
                for p, c in chunk:
                    if p.item.path in failed:
                        continue
                    pending = kept.get(p.sha256)
                    if pending is None:  # the maps of every copy still to come when the image is kept, else of this one
                        keep = remaining[p.sha256] > 1 and held[0] + size <= self.cache_bytes
                        copies = tuple(x for x in p.copies if x >= c) if keep else (c,)
                        pending = start(p, copies)
                        started.append((pending, p.sha256, copies))
                        if keep:
                            kept[p.sha256] = pending
                            held[0] += size
                    out.append((p, c, pending))
                if maps_here and started:  # before any of these rows reaches a thread
                    for (pending, _, _), maps in zip(started, maps_of([(sha, cs) for _, sha, cs in started], s.decode)):
                        pending.matrices = maps
                yield from out

        def job(p: Planned, c: int, pending: _Decode):
            base = pending.get()
            if base.error:
                return p, c, pending, None, base.error
            return p, c, pending, warp_copy(base, p.sha256, c, s.decode), None

        def some(rows):  # ROWS_PER_JOB rows a job: one future a row cost more Python than a warp does
            return [job(*row) for row in rows]

        window = 4 * self.workers
        if self._procs is not None:  # full groups ahead, while the rows held ahead stay within WINDOW_BYTES
            window = max(window, min(window * PROCESS_TASK_IMAGES, WINDOW_BYTES // size))
        elif self._torch_decoder is not None:  # a few of the decoder's batches ahead
            window = max(window, min(4 * GPU_DECODE_IMAGES, WINDOW_BYTES // size))
        parts = _ordered(self._pool, some, _chunks(jobs(), ROWS_PER_JOB), window=max(2 * self.workers,
                                                                                   window // ROWS_PER_JOB))
        done = (r for part in parts for r in part)
        for p, c, pending, pixels, error in done:
            remaining[p.sha256] -= 1
            if (error or not remaining[p.sha256]) and kept.pop(p.sha256, None) is not None:
                held[0] -= size
            if p.item.path in failed:
                continue
            if error:
                failed.add(p.item.path)
                writer.skip(p.item.path, error)
                continue
            if not pending.counted:
                pending.counted = True
                self.decodes += 1
            yield Planned(p.item, p.sha256, (c,), [pixels], p.image)

    def _decoder(self, plan: list[Planned], s: BlockSettings):
        """start(planned, copies) -> `_Decode` of a `Base` (pixels and the copies' warp maps, or an error):
        submitted to a worker process now, or decoded by the first pool thread that asks for it."""
        if self._torch_decoder is not None:
            return _GpuGroup(self, s.decode, GPU_DECODE_IMAGES).start
        if self._wants_processes(len(plan)):
            self._start_processes()
        if self._procs is None:
            def here(p: Planned, copies: tuple) -> _Decode:
                def call() -> Base:
                    pixels, data = self._pixels_of(p), self._bytes_of(p)
                    return decode_base(p.item, p.sha256, s.decode, copies, data, pending.matrices, pixels)

                pending = _Decode(call=call)
                return pending

            return here
        self._check_started()
        return _Group(self, s.decode, PROCESS_TASK_IMAGES).start

    def run(self, blocks: Iterable[Block], s: BlockSettings, writer) -> Iterator[list[BlockResult]]:
        # Batches are filled into two reused float32 buffers (alternating: the one in flight is never
        # touched): a fresh 8 MiB array per batch costs more CPU in page faults than decoding does.
        from convcache.runtime import host_buffer

        side, session = s.decode.size, self.session
        pinned = getattr(session, "device", "cpu") == "cuda"  # page-locked where the batch goes to a GPU
        buffers = itertools.cycle([host_buffer((s.batch_size, side, side, 3), getattr(session, "input_dtype",
                                                                                     np.float32), pinned)
                                   for _ in range(2)])
        shapes = store_variables(self.session.contract)
        open_blocks: deque[_Open] = deque()
        pending: list[tuple[_Open, int, np.ndarray]] = []
        in_flight = None

        def fill_and_stage(batch, pixels):
            for i, px in enumerate(pixels):
                batch[i] = px
            return self.session.stage(batch)

        def submit(rows):
            # batch n+1 is filled and staged by a thread of its own, beside n's run, not by this one: each row's
            # copy releases the GIL and must win it back from the threads doing Python meanwhile (measured: 11 µs
            # a row alone, 2.5 ms beside a thread running Python), and this thread is the one every row waits on
            batch = next(buffers)[: len(rows)]
            staged = self._stage_pool.submit(fill_and_stage, batch, [px for _, _, px in rows])
            return rows, self._infer_pool.submit(lambda: scatter(rows, self.session.run_staged(staged.result())))

        def scatter(rows, out) -> None:
            """A batch's features into their blocks, on the inference thread (a copy this size gives up the GIL
            and waits to win it back: on the main thread, every row waited with it). A batch is a run of
            consecutive rows of one block or a few: a slice each, not a row each."""
            k, n = 0, len(rows)
            while k < n:
                entry, i, _ = rows[k]
                j = k + 1
                while j < n and rows[j][0] is entry:
                    j += 1
                for name, values in out.items():
                    entry.features[name][i : i + j - k] = values[k:j]
                k = j

        def finish(job) -> list[_Open]:
            """Count a batch's rows into their blocks (`scatter` wrote them); the blocks now complete."""
            rows, future = job
            future.result()
            for entry, _, _ in rows:
                entry.filled += 1
            rows[-1][0].calls += 1
            done = []
            while open_blocks and open_blocks[0].filled == len(open_blocks[0].block.rows):
                e = open_blocks.popleft()  # complete: its digest on a thread of its own (32 KB a row at block5_pool;
                e.digest = self._digest_pool.submit(digest, e.block.rows, e.features)  # hashlib frees the GIL)
                done.append(e)
            return done

        held: list[_Open] = []  # finished blocks not written yet
        cut = [0]  # how many of them end on a chunk boundary, the last such one included
        last = [time.monotonic(), 0.0]  # when the last commit ended, and what it took (s)
        row_bytes = sum(int(np.prod(shape)) for shape in shapes.values()) * np.dtype(s.dtype).itemsize

        def written(done: list[_Open], final: bool = False) -> Iterator[list[BlockResult]]:
            """Write finished blocks together, and hand them to the committer (one commit): up to the last chunk
            boundary they reach (a chunk written whole, once), or all of them when `commit_seconds` has passed
            with no boundary among them (durability: an interrupt loses ~a second) or at the end; the shape never
            runs ahead of a commit. A boundary reached sooner than COMMIT_COST_RATIO times the last commit's own
            time waits, with more chunks behind it, unless HOLD_BYTES are held: with wide features (block5_pool:
            128 rows a 4 MiB chunk) a commit a chunk made commits, ~70 ms each, most of the run."""
            for e in done:
                held.append(e)
                if e.block.stop % writer.chunk_rows == 0:
                    cut[0] = len(held)
            if not held:
                return
            now = time.monotonic()
            if final:
                take = len(held)
            elif now - last[0] >= self.commit_seconds:
                take = cut[0] or len(held)
            elif cut[0] and (now - last[0] >= COMMIT_COST_RATIO * last[1] or
                             row_bytes * sum(len(e.block.rows) for e in held[: cut[0]]) >= HOLD_BYTES):
                take = cut[0]
            else:
                return
            out = held[:take]
            writer.write(out[0].block.start, {v: np.concatenate([e.features[v] for e in out]) for v in shapes})
            yield [BlockResult(e.block.start, e.block.stop, e.digest.result(), e.calls,
                               time.perf_counter() - e.t0, self.provider, os.getpid()) for e in out]
            del held[:take]
            cut[0] = 0  # take reaches the last boundary held, or past it
            end = time.monotonic()
            last[:] = [end, end - now]

        def flush(rows) -> list[_Open]:  # one batch infers while the one before it is collected
            nonlocal in_flight
            job, previous, in_flight = submit(rows), in_flight, None
            done = finish(previous) if previous is not None else []
            in_flight = job
            return done

        for block in blocks:
            entry = _Open(block, {v: np.empty((len(block.rows), *shape), s.dtype) for v, shape in shapes.items()})
            open_blocks.append(entry)
            pending += [(entry, i, px) for i, px in enumerate(decode_block(block, s))]
            while len(pending) >= s.batch_size:
                done = flush(pending[: s.batch_size])
                pending = pending[s.batch_size :]
                yield from written(done)
        if pending:
            yield from written(flush(pending))
        if in_flight is not None:
            done, in_flight = finish(in_flight), None
            yield from written(done)
        yield from written([], final=True)


def _chunks(iterable, n: int) -> Iterator[tuple[list]]:
    """Lists of n items (the last shorter), each as a one-argument job for `_ordered`."""
    it = iter(iterable)
    while chunk := list(itertools.islice(it, n)):
        yield (chunk,)


def _ordered(pool, fn, jobs, window: int):
    """pool.map with a bounded look-ahead, so decoded images never pile up in memory."""
    futures = deque()
    for job in jobs:
        futures.append(pool.submit(fn, *job))
        if len(futures) >= window:
            yield futures.popleft().result()
    while futures:
        yield futures.popleft().result()


# ---------------------------------------------------------------- one split, on either executor

@dataclass
class SplitJob:
    """One split's work in a run: its items, the copies each gets, its writer, and the entries discovery
    ignored in it (path -> reason)."""

    split: str
    items: list[Item]
    copies: list[int]
    writer: object  # convcache.store.SplitWriter
    ignored: dict = field(default_factory=dict)


def extract_split(executor: Executor, job: SplitJob, cfg, contract, summary) -> None:
    """Plan, cut, run and commit one split's missing rows on `executor` (local threads or Dask)."""
    from convcache.errors import ConvcacheError
    from convcache.runtime import cpu_model

    split, writer = job.split, job.writer
    t_start = time.perf_counter()
    committed = writer.begin_run(job.ignored)
    device = {"provider": summary.provider, "math": summary.math}
    if summary.decoder != "pillow":  # rows from another decoder's pixels are not bitwise comparable either
        device["decoder"] = summary.decoder
    check_device(writer, device, cfg.allow_mixed)
    decode = DecodeSpec(contract.size, cfg.policy, cfg.seed, cfg.max_pixels, cfg.max_bytes, dict(cfg.storage_options))

    def needed(sha256: str) -> bool:  # has this content copies still to extract? (`committed`: numpy, read-only)
        mask = committed.lookup([sha256])[0][0]
        return any(not mask >> c & 1 for c in job.copies)

    hashed = hash_with_cache(executor, job.items, writer, cfg, summary, early=(decode, needed))
    t_plan = time.perf_counter()
    summary.phases["hash"] = summary.phases.get("hash", 0.0) + t_plan - t_start
    plan = plan_rows(hashed, job.copies, committed, writer, summary)
    now = listing_of([(h.sha256, h.item.label, printable_path(h.item.path)) for h in hashed if not h.error],
                     data_location(cfg.data))
    before = writer.listing()
    summary.changes[split] = changes(before, now) if before is not None else Changes()
    writer.save_listing(now, before)  # before any row: what is trained on is this listing (unless it is the one stored)
    del hashed
    summary.phases["plan"] = summary.phases.get("plan", 0.0) + time.perf_counter() - t_plan
    settings = BlockSettings(sink=writer.sink(), split=split,
                             decode=decode,
                             input_name=contract.input_name, outputs=tuple(contract.output_names),
                             variables=tuple(store_variables(contract)),
                             batch_size=cfg.batch_size, dtype=cfg.dtype)
    start = writer.committed
    if plan:  # the runtime up (started beside the hashing; its error raised here), then its device recorded
        executor.ready()
        writer.add_device(device)
    t_run = time.perf_counter()
    failed, task_seconds, n_blocks = _run_blocks(executor, plan, settings, writer, committed.next_image, cfg,
                                                 summary)
    summary.phases["run"] = summary.phases.get("run", 0.0) + time.perf_counter() - t_run
    written = writer.committed - start
    run = None
    if written and not failed:  # the cost of the cache, for compute accounting (seconds per row on this machine)
        run = {"rows": written, "seconds": round(time.perf_counter() - t_start, 3), "provider": summary.provider,
               "math": summary.math, "cpu": cpu_model(), "batch_size": cfg.batch_size, **executor.describe(),
               "blocks": n_blocks,
               "block_seconds_mean": round(float(np.mean(task_seconds)), 3) if task_seconds else None,
               "copies": list(job.copies), "finished": _now()}
    writer.commit(run=run)  # the run's last commit: its skipped files, its record, one consolidation
    summary.skipped.update(writer.skipped)
    if failed:
        raise ConvcacheError(f"'{split}': {len(failed)} of {n_blocks} blocks failed (first: {failed[0].error}); rows "
                             f"0..{writer.committed - 1} are committed, re-run to extract the rest")


def check_device(writer, device: dict, allow_mixed: bool) -> None:
    """Rows made on another provider, in another math mode (TF32, fp16) or from another decoder's pixels (Pillow's
    records name none: stores made before decoders were recorded read the same) are not bitwise comparable with
    this run's: extending such a split is refused without `allow_mixed` (then said once). Checked before any work;
    the run's device is recorded (`writer.add_device`) once its runtime is up, just before its first row: a run
    whose runtime failed to start made no row and leaves no record that would let a later run mix in silently."""
    import logging

    from convcache.errors import ConvcacheError

    seen = writer.devices()
    if writer.committed and seen and device not in seen:
        made = "; ".join(_device_text(d) for d in seen)
        msg = (f"'{writer.split}': its {writer.committed} rows were made on {made}, this run is on "
               f"{_device_text(device)}: their features would not be bitwise comparable")
        if not allow_mixed:
            raise ConvcacheError(msg + "; --allow-mixed extends it anyway, or extract into a new store")
        logging.getLogger(__name__).warning("%s (--allow-mixed: extending it)", msg)


def _device_text(d: dict) -> str:
    return f"{d['provider']} ({d['math']}" + (f", decoded by {d['decoder']})" if d.get("decoder") else ")")


def _run_blocks(executor: Executor, plan: list[Planned], settings: BlockSettings, writer, next_image: int, cfg,
                summary) -> tuple[list, list, int]:
    """Cut the plan into blocks, run them on `executor`, commit what completes in row order (the run's final
    commit is the caller's). Returns (failed blocks, block seconds, blocks run)."""
    from tqdm import tqdm

    total = sum(len(p.copies) for p in plan)
    executor.reserve(writer, total)
    committer = Committer(writer)
    blocks = committer.track(cut_blocks(settings.split, executor.usable(plan, writer, settings), next_image,
                                        writer.committed, executor.block_rows(writer)))
    bar = tqdm(total=total, desc=f"extract {settings.split}", unit="row", disable=not cfg.progress or not total)
    failed, providers, task_seconds, n_blocks = [], set(), [], 0
    for results in executor.run(blocks, settings, writer):
        ok = [r for r in results if isinstance(r, BlockResult)]
        failed += [r for r in results if isinstance(r, BlockFailure)]
        for r in ok:
            providers.add(r.provider)
            task_seconds.append(r.seconds)
            summary.inference_calls += r.calls
            bar.update(r.stop - r.start)
        n_blocks += len(results)
        summary.rows_written += committer.add(ok)
    bar.close()
    summary.provider = ", ".join(sorted(providers)) or summary.provider
    return failed, task_seconds, n_blocks


def hash_with_cache(executor, items: list[Item], writer, cfg, summary, early=None) -> list[Hashed]:
    """Every item's hash, in item order: from the split's stat cache where the file's stat key matches
    (nothing is read), from the executor otherwise. The cache is then replaced by this listing's entries
    (a deleted file's entry goes), before any row is extracted, so an interrupted run keeps its hashing.
    `early`: passed to the executor's `hash_files` (decode the files still needed as they are hashed)."""
    from tqdm import tqdm

    keys = [statcache.stat_key(item) for item in items]
    cached, n_cached = ([None] * len(items), 0) if getattr(cfg, "rehash", False) else \
        statcache.lookup(writer.group, items, keys)
    todo = [i for i, sha in enumerate(cached) if sha is None]
    bar = tqdm(total=len(todo), desc=f"hash {writer.split}", unit="file", disable=not cfg.progress or not todo)
    fresh = iter(executor.hash_files([items[i] for i in todo], cfg, bar, early=early))
    bar.close()
    summary.files_hashed += len(todo)
    summary.files_from_stat_cache += len(items) - len(todo)
    hashed = [Hashed(item, sha) if sha is not None else next(fresh) for item, sha in zip(items, cached)]
    del cached
    keep = [i for i, (h, key) in enumerate(zip(hashed, keys)) if key is not None and h.sha256]
    if todo or len(keep) != n_cached:  # an unchanged listing, all from the cache: nothing to write
        writer.save_stat_cache([items[i].path for i in keep], [keys[i] for i in keep],
                               [hashed[i].sha256 for i in keep])
    return hashed


def _now() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="seconds")
