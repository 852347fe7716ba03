"""The listing: what a split's data folder holds *now*, as the last extract run found it (issue 30).

The store is a cache of features by content: a row says which bytes (sha256) it came from, and the label the
file had when it was extracted. What a run trains on is the listing: each listed content with its label *as
listed* (the folder it sits in now), nothing else. So a photo moved to another class folder is relabelled
without any inference, a deleted photo's rows are left out (and kept: the same bytes coming back cost
nothing), and a new photo is extracted by the next run. Rows of content no longer listed stay in the store
(a cache entry), and are never read.

Kept in the split's `bookkeeping/listing` group: arrays `sha256` (n x 32 uint8, sorted), `label` (int32) and
`path`, and attributes `digest` (SHA-256 over the sorted (sha256, label) pairs: a rename within a class does
not change it, a move between classes does), `data` (where the split was listed from) and `listed` (when this
listing was first found: a run that finds the same listing again leaves it as it is, written once).
Content listed under two labels is in no listing (extract skips it, saying so).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np

from convcache.store.layout import bookkeeping, create_bookkeeping_array, writing

GROUP = "listing"


def _as_bytes(shas) -> np.ndarray:
    if isinstance(shas, np.ndarray) and shas.dtype == np.uint8:
        return shas.reshape(-1, 32)
    return np.frombuffer(bytes.fromhex("".join(shas)), np.uint8).reshape(-1, 32) if len(shas) else \
        np.empty((0, 32), np.uint8)


def _keys(sha_bytes: np.ndarray) -> np.ndarray:
    """One comparable, sortable scalar per hash (32 raw bytes as a void scalar)."""
    return np.ascontiguousarray(sha_bytes).view(np.dtype((np.void, 32))).ravel()


def digest(sha_bytes: np.ndarray, labels: np.ndarray) -> str:
    """SHA-256 over the (sha256, label) pairs sorted by sha256: equal listings, equal digests."""
    order = np.argsort(_keys(sha_bytes), kind="stable")
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(sha_bytes[order]).tobytes())
    h.update(np.asarray(labels, "<i4")[order].tobytes())
    return h.hexdigest()


@dataclass
class Listing:
    """A split's listing: `sha256` (n x 32 uint8, sorted), `label`, `path`, its `digest`, where it came from."""

    sha256: np.ndarray
    label: np.ndarray
    path: np.ndarray
    digest: str
    data: str = ""
    listed: str = ""

    @classmethod
    def of(cls, shas, labels, paths, data: str = "") -> Listing:
        """From hex (or raw) hashes, their labels and paths, in any order."""
        b = _as_bytes(shas)
        labels = np.asarray(labels, np.int32)
        order = np.argsort(_keys(b), kind="stable")
        return cls(b[order], labels[order], np.asarray(paths, dtype=object)[order], digest(b, labels), data,
                   datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def __len__(self) -> int:
        return len(self.label)

    def same_as(self, other: Listing) -> bool:
        """The same listing found again: the same contents with the same labels, at the same paths, listed from
        the same place (when it was listed aside)."""
        return (self.digest == other.digest and self.data == other.data and len(self) == len(other)
                and np.array_equal(self.sha256, other.sha256) and bool(np.all(self.path == other.path)))

    def lookup(self, row_sha: np.ndarray) -> np.ndarray:
        """For each row's sha256 (n x 32 uint8): its position in the listing, or -1 where not listed."""
        keys, mine = _keys(_as_bytes(row_sha)), _keys(self.sha256)
        if not len(mine):
            return np.full(len(keys), -1, np.int64)
        at = np.minimum(np.searchsorted(mine, keys), len(mine) - 1)
        return np.where(mine[at] == keys, at, -1).astype(np.int64)


@dataclass(frozen=True)
class Changes:
    """What differs between two listings: contents added, moved to another label, gone."""

    new: int = 0
    relabelled: int = 0
    gone: int = 0

    def __bool__(self) -> bool:
        return bool(self.new or self.relabelled or self.gone)

    def __str__(self) -> str:
        return f"+{self.new} new, {self.relabelled} relabelled, {self.gone} gone" if self else "unchanged"


def listing_of(entries, data: str = "") -> Listing:
    """The listing of (sha256 hex, label, path) entries, one per readable file: each content once (its first
    path), with its label; content listed under two labels is left out (extract skips it, saying so)."""
    labels: dict = {}
    first: dict = {}
    for sha, label, path in entries:
        got = labels.setdefault(sha, label)
        if got != label:
            labels[sha] = -1
        first.setdefault(sha, path)
    keep = [s for s in first if labels[s] != -1]
    return Listing.of(keep, [labels[s] for s in keep], [first[s] for s in keep], data)


def data_location(data: str) -> str:
    """Where the data is, as a later run on another working directory finds it: local paths made absolute."""
    import os

    return data if "://" in str(data) else os.path.abspath(str(data))


def changes(old: Listing | None, new: Listing) -> Changes:
    """`new` against `old` (None: every content is new)."""
    if old is None:
        return Changes(new=len(new))
    at = old.lookup(new.sha256)
    both = at >= 0
    return Changes(new=int((~both).sum()), relabelled=int((old.label[at[both]] != new.label[both]).sum()),
                   gone=int(len(old) - both.sum()))


def save(group, listing: Listing) -> None:
    """Replace the split's listing (invalid, hence ignored, until its arrays and digest are all in)."""
    book = bookkeeping(group, create=True)
    if GROUP in book:
        g = book[GROUP]
        g.update_attributes({"digest": None})
    else:
        g = book.create_group(GROUP, attributes={"digest": None})
    n = len(listing)
    for name, values, shape, chunks, dtype in (("sha256", listing.sha256, (n, 32), (65536, 32), "uint8"),
                                               ("label", listing.label, (n,), (65536,), "int32"),
                                               ("path", listing.path, (n,), (65536,), str)):
        if name in g:
            arr = writing(g[name])
            arr.resize((n, *arr.shape[1:]))
        else:
            arr = create_bookkeeping_array(g, name, shape, chunks, dtype)
        if n:
            arr[:] = values
    g.update_attributes({"digest": listing.digest, "rows": n, "data": listing.data, "listed": listing.listed})


class Unfinished(Exception):
    """The split has a listing that is not whole: a run is writing it now, one was killed while writing it, or
    it was damaged since."""


def load(group, strict: bool = False) -> Listing | None:
    """The split's listing; None for a store older than listings. One that is not whole (`Unfinished`): None,
    or with `strict` (readers: reading every row as current would serve moved and deleted photos' rows with
    their old labels), raised. A writer takes it as none and writes it again."""
    book = bookkeeping(group)
    if book is None or GROUP not in book:
        return None
    g = book[GROUP]
    if not g.attrs.get("digest"):
        if strict:
            raise Unfinished("it is being written (or its writer was killed)")
        return None
    sha, label, path = g["sha256"][:], g["label"][:], g["path"][:]
    if digest(sha, label) != g.attrs["digest"]:
        if strict:
            raise Unfinished("its contents do not match its digest (being rewritten, or damaged)")
        return None
    return Listing(sha, label.astype(np.int32), path, g.attrs["digest"], g.attrs.get("data", ""),
                   g.attrs.get("listed", ""))
