"""The Zarr side: one group per split, rows written in chunk-aligned blocks, committed after they land.

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

import logging
import time

import numpy as np
import zarr

from convcache.artifacts import STORE_COLUMNS, committed_rows
from convcache.errors import ConvcacheError
from convcache.imaging import printable_path
from convcache.integrity import (
    CHAIN_START,
    DIGEST_ARRAYS,
    KEYS_ARRAY,
    chain_next,
    committed_blocks,
    create_digest_arrays,
    keys_digest,
    schema_bytes,
    seal,
    verify,
)
from convcache.store import append_run, create_split, write_skipped

log = logging.getLogger(__name__)

CHUNK_BYTES = 4 << 20


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


class SplitWriter:
    def __init__(self, root: zarr.Group, split: str, identity: dict, provenance: dict, feature_shape: tuple,
                 dtype: str, chunk_rows: int | None = None, repair: bool = False, guard=None, name: str = "the store"):
        self.split = split
        where = f"{name} ('{split}')"  # for messages: the store's path and the split
        self.guard = guard  # called before every mutation: raises if this writer lost its lease
        self.consolidate_seconds = 0.0  # see commit()
        self._consolidated = 0.0
        row_bytes = int(np.prod(feature_shape)) * np.dtype(dtype).itemsize
        if guard:
            guard()
        fresh = split not in root
        if not fresh:
            # the writer reads the truth, never the (possibly older) consolidated copy of it
            self.group = zarr.open_group(root.store, path=split, mode="r+", use_consolidated=False)
            missing = [name for name in STORE_COLUMNS if name not in self.group]
            if missing and (repair or not committed_rows(self.group.attrs, where)):
                # a run killed while creating the split: nothing was committed, so start it again
                log.info("'%s' was created only in part (missing %s); creating it again", split, ", ".join(missing))
                del root[split]
                fresh = True
            elif missing:
                raise ConvcacheError(f"the store's '{split}' split lacks {', '.join(missing)}: it is damaged; run "
                                     "extract again with --repair to rebuild it from the images")
            else:
                self._check_identity(identity)
        if fresh:
            args = (root, split, {**provenance, "identity": identity}, feature_shape, dtype,
                    chunk_rows or max(1, CHUNK_BYTES // row_bytes))
            try:
                self.group = create_split(*args)
            except (zarr.errors.ContainsArrayError, zarr.errors.ContainsGroupError, FileExistsError):
                # its arrays are there but the split's own zarr.json is gone: not a split anyone can read
                if not repair:
                    raise ConvcacheError(f"{where}: the split's own metadata ({split}/zarr.json) is missing while "
                                         "its arrays remain: the store is damaged; run extract again with --repair "
                                         "to rebuild the split from the images") from None
                log.warning("repair: '%s' lost its metadata; rebuilding it from the images", split)
                zarr.core.sync.sync(root.store.delete_dir(split))
                self.group = create_split(*args)
        self.arrays = {name: self.group[name] for name in STORE_COLUMNS}
        self.chunk_rows = self.arrays["features"].chunks[0]
        self.committed = committed_rows(self.group.attrs, where)
        self.skipped: dict = {}  # this run's (written at its end: see commit)
        # one handle per array: a fresh group[name] could come from the (older) consolidated metadata
        if any(name not in self.group for name in DIGEST_ARRAYS):  # a store from before block digests
            self.digests = create_digest_arrays(self.group, self.committed)
        else:
            self.digests = {name: self.group[name] for name in (*DIGEST_ARRAYS, KEYS_ARRAY) if name in self.group}
        self._check_integrity(repair)  # before anything is dropped: a damaged split is left as it is
        self._drop_uncommitted_blocks()
        self._resize(self.committed)  # drop whatever a killed run wrote past the last commit
        self._schema = schema_bytes(self.group)
        self._chain = CHAIN_START
        for digest in self.digests["block_sha256"][:]:
            self._chain = chain_next(self._chain, digest)
        self._written = self.committed  # rows written on this process, committed or not (write_features)

    def _drop_uncommitted_blocks(self) -> None:
        keep = committed_blocks(self.digests["block_start"][:].tolist(), self.committed)
        for arr in self.digests.values():
            if arr.shape[0] != keep:
                arr.resize((keep, *arr.shape[1:]))

    def _check_integrity(self, repair: bool) -> None:
        """What this writer reads to decide (the small columns, by their keys digests), the structure and
        seal, and the last block in full; with `repair`, every block (see convcache.integrity)."""
        damage, _ = verify(self.group, contents="all" if repair else "keys")
        if not damage:
            return
        where = "; ".join(str(d) for d in damage[:3]) + (f"; and {len(damage) - 3} more" if len(damage) > 3 else "")
        if not repair:
            raise ConvcacheError(f"the store's '{self.split}' split is damaged ({where}); run extract again with "
                                 "--repair to recompute those rows from the images")
        first = min(d.start for d in damage)
        log.warning("repair: '%s' keeps rows 0..%d and recomputes the rest (%s)", self.split, first - 1, where)
        self.committed = first  # everything from the first damaged row is recomputed from the images
        self._drop_uncommitted_blocks()
        chain = CHAIN_START
        for digest in self.digests["block_sha256"][:]:
            chain = chain_next(chain, digest)
        self.group.update_attributes({"committed_rows": first, "seal": seal(schema_bytes(self.group), first, chain)})

    def _check_identity(self, identity: dict) -> None:
        stored = self.group.attrs.get("identity")
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
        """What is committed, as `Committed` (numpy columns: a few dozen bytes a row, no dict per image)."""
        n = self.committed
        return Committed(self.arrays["sha256"][:n], self.arrays["copy"][:n], self.arrays["image"][:n])

    def _resize(self, rows: int) -> None:
        for arr in self.arrays.values():
            if arr.shape[0] != rows:
                arr.resize((rows, *arr.shape[1:]))

    def write_features(self, start: int, features: np.ndarray) -> None:
        """Write a block's features (rows start..) on this process, growing the arrays to the block's end
        only: the shape never runs ahead of the data. Its commit follows (`commit_blocks`)."""
        stop, expected = start + len(features), max(self.committed, self._written)
        if start != expected:
            raise ConvcacheError(f"internal: block {start}..{stop - 1} written after row {expected}")
        if self.guard:  # before every mutation: a writer that lost its lease never resizes or writes
            self.guard()
        self._resize(stop)
        self.arrays["features"][start:stop] = features
        self._written = stop

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

    def commit(self, rows: int | None = None, final: bool = True) -> None:
        """Move `committed_rows`: what a commit writes is O(block), whatever the split's size (the
        attributes hold no list that grows with the data). The run's skipped files are written on the
        final commit (`rows` None), in arrays of their own. The consolidated metadata (a snapshot for
        xarray-style readers) is refreshed on every commit, or with `consolidate_seconds` set, at most
        that often and on a final commit: a plain reader then sees an older commit, still a consistent one."""
        if self.guard:
            self.guard()
        self.committed = self.committed if rows is None else rows
        if rows is None:
            write_skipped(self.group, self.skipped)
        fence = {"writer_fence": self.guard.token} if getattr(self.guard, "token", None) is not None else {}
        self.group.update_attributes({"committed_rows": self.committed,
                                      "seal": seal(self._schema, self.committed, self._chain), **fence})
        now = time.monotonic()
        if rows is None or final or now - self._consolidated >= self.consolidate_seconds:
            self._consolidate()
            self._consolidated = now

    def _consolidate(self) -> None:
        """Refresh the root's consolidated metadata (what xarray.open_zarr reads first)."""
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zarr warns that consolidated metadata is not in the v3 spec yet
            zarr.consolidate_metadata(self.group.store)

    def record_run(self, run: dict) -> None:
        """Append a finished run's cost (rows, seconds, where) to the split's run log (`store.append_run`)."""
        append_run(self.group, run)
        self._consolidate()  # readers of the consolidated metadata (FeatureStore, xarray) see it too

    def skip(self, path: str, reason: str) -> None:
        self.skipped[printable_path(path)] = reason
