"""The store's write side: the root (`open_root`), one `SplitWriter` per split, and `FeatureSink`, the one
interface through which the extract engine's executors write features, in this process or on a Dask worker.
Rows are written in chunk-aligned blocks and committed after they land.

Crash safety: a group's `committed_rows` attribute is the only truth. For each block the arrays
grow to the block's end, the block is written (each Zarr chunk file is replaced atomically), then
`committed_rows` moves forward (zarr.json is also replaced atomically) and the consolidated
metadata is refreshed. Between commits the arrays' shapes equal `committed_rows`, so plain
zarr/xarray/dask readers see only committed rows; only a kill inside one block's write can leave
that one block visible past the commit, and the next run truncates it. A re-run truncates anything
past `committed_rows` and computes it again, so a kill at any moment leaves no half-written or
duplicate rows in what `FeatureStore` reads.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from convcache.errors import ConvcacheError
from convcache.imaging import printable_path
from convcache.store import layout, statcache
from convcache.store import listing as listing_mod
from convcache.store.integrity import (
    CHAIN_START,
    KEYS_ARRAY,
    chain_next,
    committed_blocks,
    create_digest_arrays,
    digest_arrays,
    kept,
    keys_digest,
    schema_bytes,
    seal,
    verify,
)
from convcache.store.layout import committed_rows
from convcache.store.reader import RUN_LOG, SKIPPED_ARRAYS, read_runs, read_skipped

log = logging.getLogger(__name__)

CHUNK_BYTES = 4 << 20
EXISTING = ("sha256", "copy", "image")  # what the plan needs of the committed rows (`SplitWriter.existing`)


@contextmanager
def interrupts_deferred():
    """Ctrl-C (SIGINT) inside the block is held until the block is done, then raised: a commit (the split's
    `committed_rows`, then the root's consolidated snapshot) is never left half done by an interrupt. Only in
    the main thread, with Python's default handler installed; elsewhere a no-op."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    got = []
    previous = signal.signal(signal.SIGINT, lambda *_: got.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if got:
        raise KeyboardInterrupt


def open_root(output: str, classes: list[str], storage_options: dict | None = None, provenance: dict | None = None):
    """The store's root group for writing (created if absent, with `provenance` among its attributes), checked
    against `classes`. A store in the first layout is migrated to this one (`layout.migrate`): call it under
    the writer's lease."""
    from convcache.location import resolve

    loc = resolve(output, storage_options, what="-o", write=True)
    layout.require_zarr()
    try:
        if loc.exists() and not loc.child("zarr.json").isfile():
            raise ConvcacheError(f"-o {output}: exists and is not a Zarr store")
        # the writer reads the truth, never the (possibly older) consolidated snapshot
        root = layout.open_group(layout.zarr_store(loc), mode="a", consolidated=False)
        fmt = root.attrs.get("format")
    except ConvcacheError:
        raise
    except Exception as exc:  # corrupt zarr.json and friends; credentials or network for a URL
        raise ConvcacheError(f"-o {output}: unreadable store metadata ({exc.__class__.__name__}: {exc})") from None
    if fmt is None:
        root.update_attributes({"format": layout.FORMAT, "classes": classes, **(provenance or {})})
    elif fmt not in layout.FORMATS:
        raise ConvcacheError(f"-o {output}: not a convcache feature store")
    elif list(root.attrs["classes"]) != classes:
        raise ConvcacheError(f"-o {output}: the store has classes {list(root.attrs['classes'])}, the data has "
                             f"{classes}; class indices would change. Write to a new store.")
    elif fmt != layout.FORMAT:
        moved = layout.migrate(root, classes)
        log.info("%s: moved to the layout %s (splits %s)", output, layout.FORMAT, ", ".join(moved) or "none")
    return root


def as_variables(features, names) -> dict:
    """A block's features as name -> array for every feature variable (a bare array: the one variable)."""
    if not isinstance(features, dict):
        features = {names[0]: features} if len(names) == 1 else None
    if features is None or sorted(features) != sorted(names):
        raise ConvcacheError(f"internal: a block's features must hold exactly the variables {', '.join(names)}")
    return features


@dataclass(frozen=True)
class FeatureSink:
    """Where a block's features go: rows [start, start + n) of a split's `features`, which its `SplitWriter`
    has grown to hold them (`reserve`). Picklable: a Dask task carries it to its worker. Writes whole chunks
    only (blocks are cut at chunk boundaries), so no two writers touch one chunk; nothing is committed here."""

    store: str
    split: str
    storage_options: dict = field(default_factory=dict)

    variables: tuple = (layout.FEATURES,)

    def write(self, start: int, features) -> None:
        from convcache.location import resolve

        store = layout.zarr_store(resolve(self.store, self.storage_options))
        for name, values in as_variables(features, self.variables).items():
            layout.open_array(store, f"{self.split}/{name}")[start : start + len(values)] = values


class Committed:
    """A split's committed rows, as the planner asks about them: for a content hash, which copies are there
    (a bitmask) and its image index. Rows sorted by hash once; lookups are vectorised binary searches."""

    def __init__(self, sha256: np.ndarray, copy: np.ndarray, image: np.ndarray):
        keys = np.ascontiguousarray(sha256, np.uint8).reshape(-1, 32).view("V32").ravel()
        order = np.argsort(keys, kind="stable")
        self.keys, self.copy, self.image = keys[order], np.asarray(copy)[order], np.asarray(image)[order]
        self.next_image = int(np.max(image)) + 1 if len(image) else 0

    def lookup(self, shas: list[str]) -> tuple[list[int], list[int | None]]:
        """For each sha256 (hex): the committed copies as bits (sum of 1 << copy), and its image index (None
        for content the split does not hold)."""
        masks, images = [0] * len(shas), [None] * len(shas)
        if not len(self.keys) or not shas:
            return masks, images
        for a in range(0, len(shas), 1 << 16):
            part = shas[a : a + (1 << 16)]
            q = np.frombuffer(bytes.fromhex("".join(part)), np.uint8).reshape(-1, 32).view("V32").ravel()
            lo, hi = np.searchsorted(self.keys, q, "left"), np.searchsorted(self.keys, q, "right")
            for i in np.flatnonzero(hi > lo).tolist():
                mask = 0
                for c in self.copy[lo[i] : hi[i]].tolist():
                    mask |= 1 << c
                masks[a + i], images[a + i] = mask, int(self.image[lo[i]])
        return masks, images


@dataclass(frozen=True)
class SplitSpec:
    """What a split's rows are and how they are stored. `identity` is what the rows depend on (an existing
    split with another is refused); `provenance` is recorded beside it; `feature_shape`: the one variable
    `features`, or `variables`: name -> shape, one per tap of a tapped extractor; `chunk_rows` None: about
    4 MiB chunks of the widest variable."""

    identity: dict
    provenance: dict
    feature_shape: tuple = ()
    dtype: str = "float32"
    chunk_rows: int | None = None
    variables: dict | None = None

    @property
    def shapes(self) -> dict:
        return dict(self.variables) if self.variables else {layout.FEATURES: tuple(self.feature_shape)}

    def __post_init__(self):
        if self.dtype not in ("float32", "float16"):
            raise ConvcacheError(f"dtype {self.dtype}: a store holds float32 or float16 features")
        if self.chunk_rows is not None and self.chunk_rows < 1:
            raise ConvcacheError("chunk_rows must be >= 1")


class SplitWriter:
    """The one writer of a split: opens (or creates) it, checks it, and commits blocks in row order. `guard` is
    called before every mutation and raises once this writer has lost its lease (`convcache.store.lease`)."""

    def __init__(self, root, split: str, spec: SplitSpec, store: str = "the store",
                 storage_options: dict | None = None, repair: bool = False, guard=None):
        self.split = split
        self.store, self.storage_options = store, dict(storage_options or {})
        where = f"{store} ('{split}')"  # for messages: the store's path and the split
        self.guard = guard  # called before every mutation: raises if this writer lost its lease
        self.consolidate_seconds = 0.0  # see commit()
        self._consolidated = 0.0
        self.changed = False  # has this writer changed the split's rows (their shape, data or commit)?
        if guard:
            guard()
        self.group = self._open(root, split, spec, repair, where)
        self.variables = layout.variables(self.group)
        self.arrays = {name: self.group[name] for name in layout.columns(self.group)}
        self.chunk_rows = self.arrays[self.variables[0]].chunks[0]
        self.committed = committed_rows(self.group.attrs, where)
        self.skipped: dict = {}  # this run's (written at its end: see commit)
        self._existing = None  # the columns `existing` needs, as the opening check read them
        # one handle per array: a fresh group[name] could come from the (older) consolidated metadata
        self.digests = digest_arrays(self.group)
        if self.digests is None:  # a store from before block digests
            self.digests = create_digest_arrays(self.group, self.committed)
            self.changed = True
        self._check_integrity(repair)  # before anything is dropped: a damaged split is left as it is
        self._drop_uncommitted_blocks()
        self._resize(self.committed)  # drop whatever a killed run wrote past the last commit
        self._schema = schema_bytes(self.group)
        self._chain = CHAIN_START
        for digest in self.digests["block_sha256"][:]:
            self._chain = chain_next(self._chain, digest)
        self._written = self.committed  # rows written on this process, committed or not (write_features)

    def _open(self, root, split: str, spec: SplitSpec, repair: bool, where: str):
        """The split's group: the existing one (its identity checked), or a new one; a split killed while it was
        being created (nothing committed) is created again."""
        fresh = split not in root
        if not fresh:
            # the writer reads the truth, never the (possibly older) consolidated copy of it
            group = layout.CachedGroup(layout.open_group(root, split, mode="r+", consolidated=False))
            missing = [name for name in layout.columns(group) if name not in group]
            if missing and (repair or not committed_rows(group.attrs, where)):
                # a run killed while creating the split: nothing was committed, so start it again
                log.info("'%s' was created only in part (missing %s); creating it again", split, ", ".join(missing))
                del root[split]
                fresh = True
            elif missing:
                raise ConvcacheError(f"the store's '{split}' split lacks {', '.join(missing)}: it is damaged; run "
                                     "extract again with --repair to rebuild it from the images")
            else:
                self._check_identity(group, spec.identity)
                return group
        row_bytes = max(int(np.prod(shape)) for shape in spec.shapes.values()) * np.dtype(spec.dtype).itemsize
        args = (root, split, {**spec.provenance, "identity": spec.identity}, spec.shapes, spec.dtype,
                spec.chunk_rows or max(1, CHUNK_BYTES // row_bytes), list(spec.identity.get("classes") or []))
        self.changed = True
        try:
            return layout.CachedGroup(layout.create_split(*args))  # each member opened once
        except layout.contains_errors():
            # its arrays are there but the split's own zarr.json is gone: not a split anyone can read
            if not repair:
                raise ConvcacheError(f"{where}: the split's own metadata ({split}/zarr.json) is missing while "
                                     "its arrays remain: the store is damaged; run extract again with --repair "
                                     "to rebuild the split from the images") from None
            log.warning("repair: '%s' lost its metadata; rebuilding it from the images", split)
            layout.delete_dir(root, split)
            return layout.CachedGroup(layout.create_split(*args))

    def _drop_uncommitted_blocks(self) -> None:
        keep = committed_blocks(self.digests["block_start"][:].tolist(), self.committed)
        for arr in self.digests.values():
            if arr.shape[0] != keep:
                arr.resize((keep, *arr.shape[1:]))
                self.changed = True

    def _check_integrity(self, repair: bool) -> None:
        """What this writer reads to decide (the small columns, by their keys digests), the structure and
        seal, and the last block in full; with `repair`, every block (see convcache.store.integrity)."""
        keep = {name: [] for name in EXISTING}
        damage, _ = verify(self.group, contents="all" if repair else "keys", keep=keep)
        if not damage:  # the columns the plan needs, as the check read them (`existing`)
            self._existing = kept(keep, self.committed)
            return
        where = "; ".join(str(d) for d in damage[:3]) + (f"; and {len(damage) - 3} more" if len(damage) > 3 else "")
        if not repair:
            raise ConvcacheError(f"the store's '{self.split}' split is damaged ({where}); run extract again with "
                                 "--repair to recompute those rows from the images")
        first = min(d.start for d in damage)
        log.warning("repair: '%s' keeps rows 0..%d and recomputes the rest (%s)", self.split, first - 1, where)
        self.committed = first  # everything from the first damaged row is recomputed from the images
        self.changed = True
        self._drop_uncommitted_blocks()
        chain = CHAIN_START
        for digest in self.digests["block_sha256"][:]:
            chain = chain_next(chain, digest)
        self.group.update_attributes({"committed_rows": first, "seal": seal(schema_bytes(self.group), first, chain)})

    def _check_identity(self, group, identity: dict) -> None:
        stored = group.attrs.get("identity")
        if stored != identity:
            diff = sorted(k for k in identity if stored is None or stored.get(k) != identity[k])
            raise ConvcacheError(
                f"the store's '{self.split}' split was written with a different {', '.join(diff)}; "
                "refusing to mix them. Write to a new store (-o OTHER.zarr).")

    def begin_run(self, ignored: dict | None = None) -> Committed:
        """Start a run on this split: files are retried on every run, so the skipped list starts afresh
        with the entries discovery could not use (FIFOs, loops, ...). Returns `existing()`."""
        self.skipped = {}
        for path, reason in (ignored or {}).items():
            self.skip(path, reason)
        return self.existing()

    def existing(self) -> Committed:
        """What is committed, as `Committed` (numpy columns: a few dozen bytes a row, no dict per image): the
        columns the opening check read, when they are this many rows, else read now."""
        n = self.committed
        got, self._existing = self._existing, None
        if got is None or any(len(v) != n for v in got.values()):
            got = {name: self.arrays[name][:n] for name in EXISTING}
        return Committed(got["sha256"], got["copy"], got["image"])

    def _resize(self, rows: int) -> None:
        for arr in self.arrays.values():
            if arr.shape[0] != rows:
                arr.resize((rows, *arr.shape[1:]))
                self.changed = True

    def write(self, start: int, features) -> None:
        """Write a block's features (rows start..; an array, or name -> array for every feature variable) on
        this process, growing the arrays to the block's end only: the shape never runs ahead of the data. Its
        commit follows (`commit_blocks`)."""
        features = as_variables(features, self.variables)
        stop, expected = start + len(next(iter(features.values()))), max(self.committed, self._written)
        if start != expected:
            raise ConvcacheError(f"internal: block {start}..{stop - 1} written after row {expected}")
        if self.guard:  # before every mutation: a writer that lost its lease never resizes or writes
            self.guard()
        self._resize(stop)
        for name, values in features.items():
            self.arrays[name][start:stop] = values
        self._written, self.changed = stop, True

    # --- Dask: workers write whole feature chunks in reserved rows; this writer alone commits ---

    def reserve(self, rows: int) -> None:
        """Grow every column to committed + `rows` so that workers can write feature chunks there. Until
        they are committed those rows read as fill values (0) to plain Zarr readers; `committed_rows`
        stays the truth, and a re-run truncates whatever was reserved but not committed."""
        if self.guard:
            self.guard()
        self._resize(self.committed + rows)

    def commit_blocks(self, blocks: list[tuple[int, int, dict, bytes]]) -> None:
        """Commit contiguous blocks (start, stop, small columns, digest) whose features a worker already
        wrote, in one commit: the small columns (planned on the client), each block's digest (computed
        by the worker over every column), then `committed_rows`. Blocks commit strictly in row order."""
        if self.guard:
            self.guard()
        start = self.committed
        for a, b, _, _ in blocks:
            if a != start:
                raise ConvcacheError(f"internal: block {a}..{b} committed after row {start}")
            start = b
        first, stop = blocks[0][0], blocks[-1][1]
        for name in blocks[0][2]:
            values = [c[name] for _, _, c, _ in blocks]
            self.arrays[name][first:stop] = np.concatenate(values) if len(values) > 1 else values[0]
        n_blocks = self.digests["block_start"].shape[0]
        values = {"block_start": np.array([a for a, _, _, _ in blocks], np.int64),
                  "block_sha256": np.stack([np.frombuffer(d, np.uint8) for _, _, _, d in blocks])}
        if KEYS_ARRAY in self.digests:
            values[KEYS_ARRAY] = np.stack([np.frombuffer(keys_digest(c), np.uint8) for _, _, c, _ in blocks])
        for name, value in values.items():
            arr = self.digests[name]
            arr.resize((n_blocks + len(blocks), *arr.shape[1:]))
            arr[n_blocks:] = value
        for _, _, _, digest in blocks:
            self._chain = chain_next(self._chain, digest)
        self.commit(stop, final=False)

    def commit(self, rows: int | None = None, final: bool = True, run: dict | None = None) -> None:
        """Move `committed_rows`: what a commit writes is O(block), whatever the split's size (the
        attributes hold no list that grows with the data). The run's final commit (`rows` None) writes its
        skipped files (in arrays of their own, when they differ from the last run's) and `run`, its record in
        the run log. The consolidated metadata (a snapshot for xarray-style readers) is refreshed on every
        commit, or with `consolidate_seconds` set, at most that often and on a final commit: a plain reader
        then sees an older commit, still a consistent one.

        A run that changed no row leaves the split's attributes as they are on its final commit; with the same
        skipped files and no record to add it writes nothing there: only the snapshot is refreshed (a run killed
        before its last consolidation leaves it behind the split: the next run, even one with nothing to do,
        brings it level)."""
        if self.guard:
            self.guard()
        self.committed = self.committed if rows is None else rows
        if rows is None:
            self._write_skipped()
            if run is not None:
                self._record_run(run)
            if not self.changed:
                with interrupts_deferred():
                    self._consolidate()
                return
        self.changed = True
        fence = {"writer_fence": self.guard.token} if getattr(self.guard, "token", None) is not None else {}
        with interrupts_deferred():  # a Ctrl-C between the two leaves readers of the snapshot behind the split
            self.group.update_attributes({"committed_rows": self.committed,
                                          "seal": seal(self._schema, self.committed, self._chain), **fence})
            now = time.monotonic()
            if rows is None or final or now - self._consolidated >= self.consolidate_seconds:
                self._consolidate()
                self._consolidated = now

    def _consolidate(self) -> None:
        """Refresh the root's consolidated metadata (what xarray.open_zarr reads first)."""
        layout.consolidate(self.group)

    def sink(self) -> FeatureSink:
        """Where an executor's workers write this split's features (rows this writer has reserved)."""
        return FeatureSink(self.store, self.split, dict(self.storage_options), tuple(self.variables))

    def listing(self):
        """The split's listing as the last run saved it (None: none yet)."""
        return listing_mod.load(self.group)

    def save_listing(self, listing, stored) -> bool:
        """Replace the split's listing (what a run trains on: `convcache.store.listing`), unless `stored` (what
        `listing()` gave) is the same (contents, labels, paths and where it was listed from): rewriting it would
        only open a window in which a concurrent reader finds no whole listing. Returns whether it was written."""
        if stored is not None and stored.same_as(listing):
            return False
        listing_mod.save(self.group, listing)
        self._consolidate()
        return True

    def save_stat_cache(self, paths: list[str], keys: list[str], shas: list[str]) -> None:
        """Replace the split's stat cache (`convcache.store.statcache`)."""
        statcache.save(self.group, paths, keys, shas)

    def devices(self) -> list[dict]:
        """Every (provider, math mode) the split's rows were made with: the split's `devices` attribute, or for a
        store older than it, what its run log says (math fp32 unless the provider is CUDA, whose default is
        TF32)."""
        got = self.group.attrs.get("devices")
        if got is not None:
            return [dict(d) for d in got]
        out = []
        for run in read_runs(self.group):
            for provider in str(run.get("provider", "")).split(", "):
                d = {"provider": provider, "math": run.get("math") or (
                    "tf32" if provider == "CUDAExecutionProvider" else "fp32")}
                if provider and d not in out:
                    out.append(d)
        return out

    def add_device(self, device: dict) -> None:
        """Record that this run's rows come from `device` (before any of them is written)."""
        seen = self.devices()
        if device not in seen:
            self.group.attrs["devices"] = [*seen, dict(device)]

    def _record_run(self, run: dict) -> None:
        """Append a finished run's cost (rows, seconds, where) to the split's run log: one JSON record a run,
        in the bookkeeping group (its final commit's consolidation shows it to snapshot readers)."""
        book = layout.bookkeeping(self.group, create=True)
        if RUN_LOG in book:
            arr = layout.writing(book[RUN_LOG])
            n = arr.shape[0]
            arr.resize((n + 1,))
        else:
            arr, n = layout.create_bookkeeping_array(book, RUN_LOG, (1,), (1024,), str), 0
        arr[n:] = np.array([json.dumps(run, sort_keys=True)], dtype=object)

    def _write_skipped(self) -> None:
        """Replace the split's skipped-file list (path -> reason) with this run's, in the bookkeeping group,
        unless it is the list already there (none is an empty list)."""
        if "skipped" not in self.group.attrs and read_skipped(self.group) == self.skipped:
            return
        book = layout.bookkeeping(self.group, create=True)
        paths = sorted(self.skipped)
        for name, values in zip(SKIPPED_ARRAYS, (paths, [self.skipped[p] for p in paths])):
            if name in book:
                arr = layout.writing(book[name])
                arr.resize((len(values),))
            else:
                arr = layout.create_bookkeeping_array(book, name, (len(values),), (65536,), str)
            if values:
                arr[:] = np.array(values, dtype=object)
        if "skipped" in self.group.attrs:  # a store from before: its attribute is superseded
            self.group.update_attributes({"skipped": {}})

    def skip(self, path: str, reason: str) -> None:
        self.skipped[printable_path(path)] = reason
