"""The feature store's schema in one place: its write side (`open_root`, `create_split`, used by extract's
`SplitWriter`) and its read side, `FeatureStore`, shared by every stage that reads a store (train,
compare). Typed properties describe the store; only committed rows are ever visible."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from convcache import artifacts
from convcache.artifacts import STORE_FORMAT as FORMAT
from convcache.artifacts import STORE_SCHEMA
from convcache.errors import ConvcacheError

# ---------------------------------------------------------------- the write side of the schema

def open_root(output: str, classes: list[str], storage_options: dict | None = None,
              provenance: dict | None = None) -> zarr.Group:
    """The store's root group for writing (created if absent, with `provenance` among its attributes),
    checked against `classes`."""
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
        root.update_attributes({"format": FORMAT, "classes": classes, **(provenance or {})})
    elif fmt != FORMAT:
        raise ConvcacheError(f"-o {output}: not a convcache feature store")
    elif list(root.attrs["classes"]) != classes:
        raise ConvcacheError(f"-o {output}: the store has classes {list(root.attrs['classes'])}, the data has "
                             f"{classes}; class indices would change. Write to a new store.")
    return root



def create_split(root: zarr.Group, split: str, attributes: dict, feature_shape: tuple, dtype: str,
                 chunk_rows: int) -> zarr.Group:
    """A new, empty split with every column of `artifacts.STORE_SCHEMA` (features in `dtype`), nothing
    committed yet. Small columns are chunked at least 1,024 rows deep."""
    group = root.create_group(split, attributes={**attributes, "committed_rows": 0, "skipped": {}})
    small = max(chunk_rows, 1024)
    for name, dt in STORE_SCHEMA.items():
        if name == "features":
            group.create_array(name, shape=(0, *feature_shape), chunks=(chunk_rows, *feature_shape), dtype=dtype,
                               dimension_names=["row", *(f"feature_{i}" for i in range(len(feature_shape)))])
        elif name == "sha256":
            group.create_array(name, shape=(0, 32), chunks=(small, 32), dtype=dt,
                               dimension_names=["row", "sha256_byte"])
        else:
            group.create_array(name, shape=(0,), chunks=(small,), dtype=dt, dimension_names=["row"])
    return group


# ---------------------------------------------------------------- the read side

@dataclass
class SplitData:
    features: np.ndarray
    labels: np.ndarray
    image: np.ndarray
    copy: np.ndarray
    sha256: list[str]
    paths: list[str]
    row: np.ndarray | None = None  # each row's position in the split (load only)

    def __len__(self) -> int:
        return len(self.labels)


class FeatureStore:
    """Read-only view of a store. Only committed rows are visible."""

    def __init__(self, path: str | Path, storage_options: dict | None = None):
        from convcache.location import resolve

        self.location = resolve(path, storage_options, what="store")
        self.path = Path(self.location.path) if self.location.local else self.location.url
        try:
            present = self.location.child("zarr.json").isfile()
        except Exception as exc:  # credentials, network, a missing bucket
            raise ConvcacheError(f"{path}: cannot read the store ({exc.__class__.__name__}: {exc})") from None
        if not present:
            raise ConvcacheError(f"not a feature store: {path}")
        try:
            self.root = zarr.open_group(store=self.location.zarr_store(read_only=True), mode="r")
            fmt = self.root.attrs.get("format")
        except Exception as exc:  # corrupt zarr.json and friends
            raise ConvcacheError(f"{path}: unreadable store metadata ({exc.__class__.__name__}: {exc})") from None
        if fmt != FORMAT:
            raise ConvcacheError(f"{path}: not a convcache feature store (format {self.root.attrs.get('format')!r})")

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

    def feature_shape(self, split: str = "train") -> tuple:
        return tuple(int(d) for d in self._group(split)["features"].shape[1:])

    def dtype(self, split: str = "train") -> str:
        """The stored features' dtype (float32 or float16)."""
        return str(self._group(split)["features"].dtype)

    def augmentation(self, split: str = "train") -> dict:
        return dict(self.attrs(split)["augment"])

    def copies_available(self, split: str = "train") -> int:
        """The largest copy index committed in `split` (0: originals only)."""
        n = self.rows(split)
        return int(self._group(split)["copy"][:n].max()) if n else 0

    def attrs(self, split: str) -> dict:
        return dict(self._group(split).attrs)

    def rows(self, split: str) -> int:
        return artifacts.committed_rows(self._group(split).attrs, f"{self.path} ('{split}')")

    def _group(self, split: str):
        if split not in self.root:
            raise ConvcacheError(f"{self.path}: no '{split}' split (has: {', '.join(self.splits) or 'none'})")
        return self.root[split]

    def verify(self, split: str) -> tuple[list, str | None]:
        """(damaged row ranges, a note if the split predates block digests); see convcache.integrity."""
        from convcache.integrity import Damage, verify

        group = self._group(split)
        damage, note = verify(group)
        recorded = (group.attrs.get("identity") or {}).get("classes")
        if recorded is not None and recorded != self.classes:
            damage.append(Damage(0, max(self.rows(split), 1), f"the store's classes {self.classes} are not the "
                                 f"{recorded} its rows were labelled with"))
        return damage, note

    def check(self, split: str) -> None:
        """Raise a one-line error naming the damaged rows, if any."""
        damage, _ = self.verify(split)
        if damage:
            where = "; ".join(str(d) for d in damage[:3]) + (f"; and {len(damage) - 3} more" if len(damage) > 3 else "")
            raise ConvcacheError(f"{self.path}: the '{split}' split is damaged ({where}); run `convcache extract "
                                 "--repair` on it to recompute those rows")

    def load(self, split: str, max_copy: int | None = None, with_features: bool = True,
             verify: bool = True) -> SplitData:
        """Rows of `split` whose copy index is <= max_copy (None: all copies), in stored order. With
        `verify`, every block's digest is checked first: damage is an error, never silent zero rows."""
        if verify:
            self.check(split)
        group, n = self._group(split), self.rows(split)
        copy = group["copy"][:n]
        keep = np.ones(n, bool) if max_copy is None else copy <= max_copy
        idx = np.flatnonzero(keep)
        features = group["features"][:n][idx] if with_features else np.empty((len(idx), 0))
        return SplitData(
            features=features,
            labels=group["label"][:n][idx],
            image=group["image"][:n][idx],
            copy=copy[idx],
            sha256=[bytes(r).hex() for r in group["sha256"][:n][idx]],
            paths=[str(p) for p in group["path"][:n][idx]],
            row=idx,
        )

    def take(self, split: str, rows) -> np.ndarray:
        """Features of committed `rows` (positions in the split, any order, repeats allowed), read chunk by
        chunk: memory is the answer plus one chunk, never the split."""
        rows = np.asarray(rows, np.int64)
        n = self.rows(split)
        if len(rows) and (rows.min() < 0 or rows.max() >= n):
            raise ConvcacheError(f"{self.path}: rows outside the {n} committed rows of '{split}'")
        wanted, inverse = np.unique(rows, return_inverse=True)
        got = self._group(split)["features"].get_orthogonal_selection((wanted,))
        return got[inverse]

    def blocks(self, split: str) -> list[tuple[int, int, bytes | None]]:
        """The committed rows as (start, stop, digest) ranges: one per commit (a chunk, or a distributed
        task); rows written before digests existed come in chunk-sized ranges with digest None."""
        from convcache.integrity import DIGEST_ARRAYS, committed_blocks

        group, n = self._group(split), self.rows(split)
        chunk = group["features"].chunks[0]
        if any(name not in group for name in DIGEST_ARRAYS):
            return [(a, min(a + chunk, n), None) for a in range(0, n, chunk)]
        starts = group["block_start"][:].tolist()
        starts = starts[: committed_blocks(starts, n)]
        digests = group["block_sha256"][: len(starts)]
        first = int(group.attrs.get("digests_from", 0))
        out = [(a, min(a + chunk, first), None) for a in range(0, first, chunk)]
        bounds = starts + [n]
        out += [(a, b, bytes(digests[i])) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]
        return out

    def iter_blocks(self, split: str, max_copy: int | None = None, shuffle: bool = False, seed: int = 0,
                    verify: bool = True, with_features: bool = True):
        """Committed rows of `split`, one block at a time (never the whole split in memory), as SplitData.
        Each block is checked against its digest as it is read (damage is an error naming its rows).
        With `shuffle`, blocks come in a seeded random order and rows are shuffled within each block."""
        from convcache.integrity import block_digest

        group = self._group(split)
        arrays = {name: group[name] for name in ("features", "label", "image", "copy", "sha256", "path")}
        if not with_features:
            arrays.pop("features")
            verify = False
        blocks = self.blocks(split)
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(blocks)) if shuffle else range(len(blocks))
        for b in order:
            start, stop, digest = blocks[b]
            if max_copy is not None and not verify and not (arrays["copy"][start:stop] <= max_copy).any():
                continue  # nothing of this block is wanted: its features are never read
            cols = {name: arr[start:stop] for name, arr in arrays.items()}
            if verify and digest is not None and block_digest(cols, arrays["features"].dtype) != digest:
                raise ConvcacheError(f"{self.path}: the '{split}' split is damaged (rows {start}..{stop - 1}: "
                                     "contents differ from the block digest); run `convcache extract --repair`")
            keep = np.ones(stop - start, bool) if max_copy is None else cols["copy"] <= max_copy
            idx = np.flatnonzero(keep)
            if shuffle:
                idx = rng.permutation(idx)
            if not len(idx):
                continue
            yield SplitData(
                features=cols["features"][idx] if with_features else np.empty((len(idx), 0)),
                labels=cols["label"][idx], image=cols["image"][idx], copy=cols["copy"][idx],
                sha256=[bytes(r).hex() for r in cols["sha256"][idx]], paths=[str(p) for p in cols["path"][idx]])

    def nbytes(self, split: str, max_copy: int | None = None, dtype=np.float32) -> int:
        """Bytes the features of `split` (copies <= max_copy) take in memory as `dtype`."""
        group, n = self._group(split), self.rows(split)
        rows = n if max_copy is None else int((group["copy"][:n] <= max_copy).sum())
        return rows * int(np.prod(self.feature_shape(split))) * np.dtype(dtype).itemsize

    def dask(self, split: str) -> dict:
        """Lazy dask arrays of the committed rows (needs the 'dist' extra)."""
        try:
            import dask.array as da
        except ImportError:
            raise ConvcacheError("dask is not installed: pip install 'convcache[dist]'") from None
        group, n = self._group(split), self.rows(split)
        return {name: da.from_zarr(group[name])[:n] for name in ("features", "label", "image", "copy")}
