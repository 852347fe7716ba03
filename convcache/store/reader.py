"""The store's read side: `FeatureStore`, shared by every stage that reads a store (train, compare, info).
Typed properties describe the store; only committed rows are ever visible. It reads both layouts
(`convcache.store.layout`)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from convcache import artifacts
from convcache.errors import ConvcacheError
from convcache.store import layout
from convcache.store import listing as listing_mod
from convcache.store.layout import bookkeeping, committed_rows

SKIPPED_ARRAYS = ("skipped_path", "skipped_reason")
RUN_LOG = "run_log"
LISTING_WAIT_SECONDS = 30.0  # a reader waits this long at most for a listing its writer is rewriting


def read_skipped(group) -> dict:
    """The files the split's last run skipped (path -> reason): the bookkeeping arrays, or the attribute of a
    store written before them."""
    book = bookkeeping(group)
    if book is not None and all(name in book for name in SKIPPED_ARRAYS):
        paths, reasons = (book[name][:] for name in SKIPPED_ARRAYS)
        if len(paths) == len(reasons):
            return {str(p): str(r) for p, r in zip(paths, reasons)}
    skipped = group.attrs.get("skipped") or {}
    return dict(skipped) if isinstance(skipped, dict) else {}


def read_runs(group) -> list[dict]:
    runs = list(group.attrs.get("runs") or [])  # a store from before the run log
    book = bookkeeping(group)
    if book is not None and RUN_LOG in book:
        runs += [json.loads(str(r)) for r in book[RUN_LOG][:]]
    return runs


def _damage(start: int, stop: int, reason: str):
    from convcache.store.integrity import Damage

    return Damage(start, stop, reason)


# ---------------------------------------------------------------- the read side

@dataclass
class SplitData:
    """Rows of a split, by the store's own column names (`layout.SCHEMA`)."""

    features: np.ndarray
    label: np.ndarray
    image: np.ndarray
    copy: np.ndarray
    sha256: list[str]
    path: list[str]
    row: np.ndarray | None = None  # each row's position in the split

    @property
    def labels(self) -> np.ndarray:  # the names before they followed the store's columns
        return self.label

    @property
    def paths(self) -> list[str]:
        return self.path

    def __len__(self) -> int:
        return len(self.label)


class FeatureStore:
    """Read-only view of a store. Only committed rows are visible."""

    def __init__(self, path: str | Path, storage_options: dict | None = None):
        from convcache.location import resolve

        self.location = resolve(path, storage_options, what="store")
        self._store = None
        self._listings: dict = {}
        self.path = Path(self.location.path) if self.location.local else self.location.url
        try:
            present = self.location.child("zarr.json").isfile()
        except Exception as exc:  # credentials, network, a missing bucket
            raise ConvcacheError(f"{path}: cannot read the store ({exc.__class__.__name__}: {exc})") from None
        if not present:
            raise ConvcacheError(f"not a feature store: {path}")
        layout.require_zarr()
        try:
            self._store = layout.zarr_store(self.location, read_only=True)
            self.root = layout.open_group(self._store)
            fmt = self.root.attrs.get("format")
        except Exception as exc:  # corrupt zarr.json and friends
            raise ConvcacheError(f"{path}: unreadable store metadata ({exc.__class__.__name__}: {exc})") from None
        if fmt not in layout.FORMATS:
            raise ConvcacheError(f"{path}: not a convcache feature store (format {self.root.attrs.get('format')!r})")

    @property
    def format(self) -> str:
        return self.root.attrs.get("format")

    @property
    def splits(self) -> list[str]:
        return sorted(self.root.group_keys())

    def __str__(self) -> str:
        return str(self.path)

    @property
    def classes(self) -> list[str]:
        classes = self.root.attrs.get("classes")
        if (not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) for c in classes)
                or len(set(classes)) != len(classes)):
            raise ConvcacheError(f"{self.path}: the store's classes attribute is {classes!r}, not a list of at "
                                 "least 2 distinct names: the store is damaged")
        return list(classes)

    def extractor_identity(self, split: str = "train") -> str:
        return self.extractor(split).identity

    def extractor_metadata(self, split: str = "train") -> dict:
        return dict(self.extractor(split).metadata)

    def extractor(self, split: str = "train") -> artifacts.Extractor:
        """The contract of the extractor that wrote `split` (from its recorded metadata and identity)."""
        try:
            recorded = self.attrs(split)["extractor"]
            return artifacts.Extractor.from_metadata(dict(recorded["metadata"]), recorded["sha256"],
                                                     where=f"{self.path} ({split})")
        except (KeyError, TypeError) as exc:
            raise ConvcacheError(f"{self.path}: the '{split}' split does not record its extractor "
                                 f"({exc.__class__.__name__}: {exc})") from None

    def variables(self, split: str = "train") -> list[str]:
        """The split's feature variables: one per tap of a tapped extractor, else `features`."""
        return layout.variables(self._group(split))

    def _variable(self, split: str, variable: str | None) -> str:
        names = self.variables(split)
        if variable is None:
            return names[0]
        if variable not in names:
            raise ConvcacheError(f"{self.path}: the '{split}' split has no feature variable {variable!r} "
                                 f"(has: {', '.join(names)})")
        return variable

    def feature_shape(self, split: str = "train", variable: str | None = None) -> tuple:
        return tuple(int(d) for d in self._group(split)[self._variable(split, variable)].shape[1:])

    def dtype(self, split: str = "train") -> str:
        """The stored features' dtype (float32 or float16)."""
        return str(self._group(split)[self.variables(split)[0]].dtype)

    def augmentation(self, split: str = "train") -> dict:
        return dict(self.attrs(split)["augment"])

    def copies_available(self, split: str = "train") -> int:
        """The largest copy index committed in `split` (0: originals only)."""
        n = self.rows(split)
        return int(self._group(split)["copy"][:n].max()) if n else 0

    def attrs(self, split: str) -> dict:
        return dict(self._group(split).attrs)

    def skipped(self, split: str) -> dict:
        """The files the split's last extract run skipped: path -> reason."""
        return read_skipped(self._group(split))

    def runs(self, split: str) -> list[dict]:
        """One record per finished extract run on the split (rows, seconds, provider, cpu, ...)."""
        return read_runs(self._group(split))

    def decoders(self) -> set[str]:
        """What decoded the pixels of the committed rows, over every split: each `devices` record's decoder (a
        record without one, or a split older than the records: Pillow). Empty while no row is committed."""
        out: set[str] = set()
        for split in self.splits:
            if self.rows(split):
                out |= {d.get("decoder", "pillow") for d in self.attrs(split).get("devices") or [{}]}
        return out

    def rows(self, split: str) -> int:
        return committed_rows(self._group(split).attrs, f"{self.path} ('{split}')")

    def _group(self, split: str):
        if split not in self.root:
            raise ConvcacheError(f"{self.path}: no '{split}' split (has: {', '.join(self.splits) or 'none'})")
        return self.root[split]

    def verify(self, split: str, contents: str = "all", max_copy: int | None = None) -> tuple[list, str | None]:
        """(damaged row ranges, a note if the split predates block digests); see convcache.store.integrity."""
        from convcache.store.integrity import Damage, verify

        self._group(split)  # named in the (consolidated) listing
        try:  # the split's own metadata, not the snapshot: plain Zarr readers see these shapes
            group = layout.CachedGroup(layout.open_group(self._store, split, consolidated=False))  # for this look
        except Exception as exc:
            return [Damage(0, max(self.rows(split), 1), f"the split's own metadata ({split}/zarr.json) is missing or "
                                                        f"unreadable ({exc.__class__.__name__})")], None
        damage, note = verify(group, contents, max_copy)
        fence, root_fence = group.attrs.get("writer_fence"), self._root_fence()
        if isinstance(fence, int) and isinstance(root_fence, int) and root_fence < fence:
            damage.append(Damage(0, max(self.rows(split), 1), f"the store's root metadata was last written by a "
                                 f"writer that had lost its lease (fencing token {root_fence} < {fence}): its "
                                 "consolidated snapshot may be older than the split; run extract again to refresh it"))
        recorded = (group.attrs.get("identity") or {}).get("classes")
        if recorded is not None and recorded != self.classes:
            damage.append(Damage(0, max(self.rows(split), 1), f"the store's classes {self.classes} are not the "
                                 f"{recorded} its rows were labelled with"))
        return damage, note

    def _root_fence(self):
        try:
            return layout.open_group(self._store, consolidated=False).attrs.get("writer_fence")
        except Exception:
            return None

    def check(self, split: str, contents: str = "all", max_copy: int | None = None) -> None:
        """Raise a one-line error naming the damaged rows, if any (`max_copy`: only the blocks that hold
        rows of copies <= max_copy are read)."""
        self._raise(split, self.verify(split, contents, max_copy)[0])

    def _raise(self, split: str, damage: list) -> None:
        if damage:
            where = "; ".join(str(d) for d in damage[:3]) + (f"; and {len(damage) - 3} more" if len(damage) > 3 else "")
            raise ConvcacheError(f"{self.path}: the '{split}' split is damaged ({where}); run `convcache extract "
                                 "--repair` on it to recompute those rows")

    def listing(self, split: str):
        """The split's listing as its last extract run found the data (`convcache.store.listing.Listing`), or
        None for a store older than listings."""
        if split not in self._listings:
            self._listings[split] = self._whole_listing(split)
        return self._listings[split]

    def _whole_listing(self, split: str):
        """The split's listing, whole. One that is not whole in this reader's snapshot is read again from the
        split's own metadata (the writer may have finished it since the snapshot), and while the store's writer
        is at work (`lease.writer_active`), again until it is whole, for up to LISTING_WAIT_SECONDS: a reader
        that meets a listing mid-rewrite waits for it instead of failing. One left half-written by a killed run
        (no writer) is a one-line error at once: the next extract writes it again."""
        from convcache.store.lease import writer_active

        try:
            return listing_mod.load(self._group(split), strict=True)
        except listing_mod.Unfinished as exc:
            why = exc
        start = time.monotonic()
        pause, waited = 0.05, False
        while True:
            try:
                return listing_mod.load(layout.open_group(self._store, split, consolidated=False), strict=True)
            except listing_mod.Unfinished as exc:
                why = exc
            if time.monotonic() - start >= LISTING_WAIT_SECONDS or not writer_active(self.location):
                break
            waited = True
            time.sleep(pause)
            pause = min(2 * pause, 0.5)
        after = f" after waiting {time.monotonic() - start:.0f} s for its writer" if waited else ""
        raise ConvcacheError(f"{self.path}: the '{split}' split's listing is not whole ({why}){after}; wait for the "
                             "extract writing it to finish, or run extract again")

    def current(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """For the committed rows: (listed: bool per row, the label each row's content has *now*, its path now);
        None without a listing (every row is current, with its stored label)."""
        got = self.listing(split)
        if got is None:
            return None
        n = self.rows(split)
        sha = self._group(split)["sha256"][:n]
        if len(sha) < n:  # committed_rows says more than the column holds: name the damage, not a shape clash
            self.check(split, contents="none")
            raise ConvcacheError(f"{self.path}: the '{split}' split is damaged (committed_rows is {n} but sha256 "
                                 f"holds {len(sha)} rows); run `convcache extract --repair` on it")
        at = got.lookup(sha)
        listed = at >= 0
        return listed, np.where(listed, got.label[np.maximum(at, 0)], -1), np.where(listed, got.path[np.maximum(at, 0)],
                                                                                       None)

    def relist(self, storage_options: dict | None = None) -> dict | None:
        """List the data the store was extracted from (its listings' `data`) as it is *now*, hashing only the
        files whose stat key is not in the split's stat cache, and read by that listing from here on (in
        memory: the store is not written). Returns split -> `Changes` against the stored listing; None when the
        store has no listing, or its data cannot be listed from here (then the stored listing stands)."""
        import hashlib

        from convcache.datasets import discover_all
        from convcache.imaging import DEFAULT_MAX_BYTES, printable_path, read_bytes
        from convcache.store import statcache

        stored = {s: self.listing(s) for s in self.splits}
        datas = {x.data for x in stored.values() if x is not None}
        if len(datas) != 1 or not next(iter(datas)):
            return None
        data = datas.pop()
        try:
            items, classes, _ = discover_all(data, storage_options)
        except ConvcacheError:
            return None
        if list(classes) != list(self.classes):
            raise ConvcacheError(f"{self.path}: the data at {data} now has classes {classes}, the store "
                                 f"{list(self.classes)}; class indices would change: extract into a new store")
        out = {}
        for split, old in stored.items():
            if old is None:
                continue
            mine = [i for i in items if i.split == split]
            keys = [statcache.stat_key(i) for i in mine]
            cached, _ = statcache.lookup(self._group(split), mine, keys)
            entries = []
            for item, sha in zip(mine, cached):
                if sha is None:
                    try:
                        sha = hashlib.sha256(read_bytes(item.path, DEFAULT_MAX_BYTES, storage_options)).hexdigest()
                    except Exception:  # unreadable now: extract would skip it, so does the listing
                        continue
                entries.append((sha, item.label, printable_path(item.path)))
            now = listing_mod.listing_of(entries, data)
            out[split] = listing_mod.changes(old, now)
            self._listings[split] = now
        return out

    def status(self, split: str) -> dict:
        """How the split's rows stand against its listing: photos listed, listed photos without an original
        row yet (an interrupted run), committed rows no longer listed (gone: kept, never read)."""
        got, cur = self.listing(split), self.current(split)
        n = self.rows(split)
        if got is None:
            return {"listed": None, "unextracted": 0, "unlisted_rows": 0, "digest": None}
        copy0 = self._group(split)["copy"][:n] == 0
        have = np.zeros(len(got), bool)
        at = got.lookup(self._group(split)["sha256"][:n][copy0])
        have[at[at >= 0]] = True
        skipped = set(self.skipped(split))  # listed but undecodable: extract skipped them, saying why
        missing = [p for p in got.path[~have] if str(p) not in skipped]
        return {"listed": len(got), "unextracted": len(missing), "unlisted_rows": int((~cur[0]).sum()),
                "digest": got.digest, "data": got.data, "listed_at": got.listed}

    def _wanted(self, split: str, max_copy: int | None, current: bool) -> tuple[np.ndarray, tuple | None]:
        """Positions of the rows to read (copies <= max_copy; with `current`, listed ones only) and the
        current labels and paths (None: as stored)."""
        n = self.rows(split)
        keep = np.ones(n, bool) if max_copy is None else self._group(split)["copy"][:n] <= max_copy
        cur = self.current(split) if current else None
        if cur is not None:
            keep &= cur[0]
        return np.flatnonzero(keep), cur

    def load(self, split: str, max_copy: int | None = None, with_features: bool = True,
             verify: bool = True, variable: str | None = None, current: bool = True) -> SplitData:
        """Rows of `split` whose copy index is <= max_copy (None: all copies), in stored order, with the
        features of `variable` (default: the split's first). Only the chunks that hold those rows are read,
        each once, and memory is the answer plus one span. With `verify`, the split's structure and seal are
        checked, and each block read is checked against its digest (which covers every variable): damage is
        an error, never silent zero rows. With `current` (the default), only rows whose content the split's
        listing holds, labelled and named as listed now (`convcache.store.listing`); without, every committed
        row as stored."""
        variable = self._variable(split, variable)
        if verify:
            self.check(split, contents="none")
        group, n = self._group(split), self.rows(split)
        copy = group["copy"][:n]
        idx, cur = self._wanted(split, max_copy, current)
        shape = self.feature_shape(split, variable)
        features = np.empty((len(idx), *shape), group[variable].dtype) if with_features else \
            np.empty((len(idx), 0))
        cols = {name: [] for name in ("label", "image", "sha256", "path")}
        at = 0
        for _, part, keep in self._spans(split, idx, verify, with_features, variable=variable):
            if with_features:
                features[at : at + len(keep)] = part["features"][keep - part["features_offset"]]
            for name in cols:
                cols[name].append(part[name][keep])
            at += len(keep)
        cat = {name: (np.concatenate(v) if v else np.empty((0, 32) if name == "sha256" else 0,
                                                              np.uint8 if name == "sha256" else object))
               for name, v in cols.items()}
        label = cat["label"].astype(np.int32) if len(idx) else np.empty(0, np.int32)
        paths = [str(p) for p in cat["path"]]
        if cur is not None:
            label, paths = cur[1][idx].astype(np.int32), [str(p) for p in cur[2][idx]]
        return SplitData(
            features=features,
            label=label,
            image=cat["image"].astype(np.int64) if len(idx) else np.empty(0, np.int64),
            copy=copy[idx],
            sha256=[bytes(r).hex() for r in cat["sha256"]],
            path=paths,
            row=idx,
        )

    def _spans(self, split: str, idx: np.ndarray, verify: bool, with_features: bool, order=None,
               variable: str | None = None):
        """For sorted row positions `idx`: (span start, the span's columns, positions of `idx` in the span),
        span by span. A span is whole committed blocks covering whole chunks, read once; only spans holding
        a wanted row are read; with `verify`, each of their blocks is checked against its digest (the
        blocks that overlap no wanted row are not read). `order`: the spans' order (default: stored). The
        span's features are `part["features"]` (those of `variable`; verifying reads every variable)."""
        from convcache.store.integrity import block_digest, span_rows, spans

        group = self._group(split)
        variable = self._variable(split, variable)
        every = layout.variables(group)
        feats = every if verify else [variable] if with_features else []
        arrays = {name: group[name] for name in [*feats, *layout.COORDINATES]}
        blocks = self.blocks(split)
        bounds = [(a, b) for a, b, _ in blocks]
        groups = spans(bounds, span_rows(group)) if bounds else []
        firsts = np.array([bounds[g[0]][0] for g in groups], np.int64)
        lasts = np.array([bounds[g[-1]][1] for g in groups], np.int64)
        lo, hi = np.searchsorted(idx, firsts), np.searchsorted(idx, lasts)
        for k in (order if order is not None else range(len(groups))):
            if lo[k] == hi[k]:
                continue  # no wanted row here: never read
            a, b = int(firsts[k]), int(lasts[k])
            keep = idx[lo[k] : hi[k]] - a
            # the span's blocks that hold a wanted row: only their feature chunks are read
            wanted = [i for i in groups[k] if np.searchsorted(keep, bounds[i][0] - a) <
                      np.searchsorted(keep, bounds[i][1] - a)]
            fa, fb = bounds[wanted[0]][0], bounds[wanted[-1]][1]
            try:
                part = {name: arr[fa:fb] if name in feats else arr[a:b] for name, arr in arrays.items()}
            except Exception as exc:
                if not verify:
                    raise
                self._raise(split, [_damage(a, b, f"unreadable chunk ({exc.__class__.__name__}: {exc})")])
            if verify:
                dtype = arrays[every[0]].dtype
                for i in wanted:
                    start, stop, digest = blocks[i]
                    if digest is None:
                        continue
                    cols = {name: v[start - (fa if name in feats else a) : stop - (fa if name in feats else a)]
                            for name, v in part.items()}
                    if block_digest(cols, dtype, [*every, *layout.COORDINATES]) != digest:
                        self._raise(split, [_damage(start, stop, "contents differ from the block digest (a chunk "
                                                                 "was altered or deleted)")])
            if with_features:  # aligned with the small columns: row r of the span is features[r - offset]
                part["features"] = part[variable]
                part["features_offset"] = fa - a
            yield a, part, keep

    def take(self, split: str, rows, variable: str | None = None) -> np.ndarray:
        """Features (of `variable`, default the first) of committed `rows` (positions in the split, any order,
        repeats allowed), read chunk by chunk: memory is the answer plus one chunk, never the split."""
        rows = np.asarray(rows, np.int64)
        n = self.rows(split)
        if len(rows) and (rows.min() < 0 or rows.max() >= n):
            raise ConvcacheError(f"{self.path}: rows outside the {n} committed rows of '{split}'")
        wanted, inverse = np.unique(rows, return_inverse=True)
        got = self._group(split)[self._variable(split, variable)].get_orthogonal_selection((wanted,))
        return got[inverse]

    def blocks(self, split: str) -> list[tuple[int, int, bytes | None]]:
        """The committed rows as (start, stop, digest) ranges: one per commit (a chunk, or a distributed
        task); rows written before digests existed come in chunk-sized ranges with digest None."""
        from convcache.store.integrity import committed_blocks, digest_arrays

        group, n = self._group(split), self.rows(split)
        chunk = group[layout.variables(group)[0]].chunks[0]
        arrays = digest_arrays(group)
        if arrays is None:
            return [(a, min(a + chunk, n), None) for a in range(0, n, chunk)]
        starts = arrays["block_start"][:].tolist()
        starts = starts[: committed_blocks(starts, n)]
        digests = arrays["block_sha256"][: len(starts)]
        first = int(group.attrs.get("digests_from", 0))
        out = [(a, min(a + chunk, first), None) for a in range(0, first, chunk)]
        bounds = starts + [n]
        out += [(a, b, bytes(digests[i])) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]
        return out

    def iter_blocks(self, split: str, max_copy: int | None = None, shuffle: bool = False, seed: int = 0,
                    verify: bool = True, with_features: bool = True, variable: str | None = None,
                    current: bool = True):
        """Committed rows of `split` (copies <= max_copy; listed ones, labelled as listed now, as `load`), one
        span of whole chunks at a time (never the whole split in memory), as SplitData. Each block read is
        checked against its digest (damage is an error naming its rows); spans with no wanted row are not
        read. With `shuffle`, spans come in a seeded random order and rows are shuffled within each span."""
        group = self._group(split)
        idx, cur = self._wanted(split, max_copy, current)
        rng = np.random.default_rng(seed)
        order = None
        if shuffle:
            from convcache.store.integrity import span_rows, spans

            order = rng.permutation(len(spans([(a, b) for a, b, _ in self.blocks(split)], span_rows(group))))
        for a, part, keep in self._spans(split, idx, verify and with_features, with_features, order, variable):
            if shuffle:
                keep = rng.permutation(keep)
            rows = keep + a
            yield SplitData(
                features=part["features"][keep - part["features_offset"]] if with_features else
                np.empty((len(keep), 0)),
                label=part["label"][keep] if cur is None else cur[1][rows].astype(np.int32),
                image=part["image"][keep], copy=part["copy"][keep],
                sha256=[bytes(r).hex() for r in part["sha256"][keep]],
                path=[str(p) for p in (part["path"][keep] if cur is None else cur[2][rows])],
                row=rows)

    def nbytes(self, split: str, max_copy: int | None = None, dtype=np.float32, variable: str | None = None) -> int:
        """Bytes the features of `split` (copies <= max_copy, listed rows; of `variable`) take as `dtype`."""
        rows = len(self._wanted(split, max_copy, True)[0])
        return rows * int(np.prod(self.feature_shape(split, variable))) * np.dtype(dtype).itemsize

    def dask(self, split: str) -> dict:
        """Lazy dask arrays of the committed rows (needs the 'dist' extra)."""
        try:
            import dask.array as da
        except ImportError:
            raise ConvcacheError("dask is not installed: pip install 'convcache[dist]'") from None
        group, n = self._group(split), self.rows(split)
        return {name: da.from_zarr(group[name])[:n] for name in (*layout.variables(group), "label", "image", "copy")}
