"""The stat cache: (path, stat key) -> sha256 of the file's bytes, kept in each split of the store, so a
re-run on unchanged data reads no image (git's index and DVC's state database work the same way).

A file's **stat key** is what changes whenever its bytes may have: on disk its size, mtime_ns, ctime_ns and
inode (a file replaced by another with the same size and mtime has a new inode, and its ctime moves;
`touch` moves mtime); on object storage its size, ETag and version from the listing. A cached hash is
trusted only while the whole key matches; anything else is hashed again. A file whose mtime lies within
`datasets.RACY_SECONDS` of the moment it was stat'ed is never cached ("racily clean", as git calls it: it could
change again within the file system's timestamp granularity and keep its key), so it is hashed next time.

It lives in the split's `bookkeeping/stat_cache` group (arrays `path`, `key`, `sha256`; see
`convcache.store.layout`), written whole once a split's files are hashed, with a digest of its contents as
an attribute: a cache that does not match its digest (a run killed while writing it) is ignored, never
trusted. It is an input cache, outside the store's digests and
seal: deleting it only costs a re-hash. `extract --rehash` ignores it and writes it afresh.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

from convcache.datasets import local_key
from convcache.store.layout import STAT_CACHE as GROUP
from convcache.store.layout import bookkeeping, create_bookkeeping_array, writing

_NAMES = ("path", "key", "sha256")


def stat_key(item) -> str | None:
    """The item's key as discovery listed it; a local file discovery did not stat (a manifest's) now."""
    if item.stat is not None or "://" in item.path:
        return item.stat or None
    try:
        return local_key(os.stat(item.path))
    except OSError:
        return None


def _digest(paths, keys, shas) -> str:
    """SHA-256 over the NUL-joined paths, then the keys, then the hashes; fed in slabs (a million paths
    joined at once would be a few hundred MB)."""
    h = hashlib.sha256()
    for tag, values in ((b"", paths), (b"\1", keys)):
        h.update(tag)
        for a in range(0, len(values), 65536):
            h.update(("\0" if a else "").encode() + "\0".join(map(str, values[a : a + 65536])).encode(
                "utf-8", "surrogatepass"))
    h.update(b"\1" + np.ascontiguousarray(shas, np.uint8).tobytes())
    return h.hexdigest()


def load_arrays(group):
    """(paths, keys, sha256 as an n x 32 uint8 array) of a split's cache, sorted by path; None when absent,
    unreadable or not matching its digest."""
    try:
        book = bookkeeping(group)
        if book is None or GROUP not in book:
            return None
        g = book[GROUP]
        paths, keys, shas = (g[name][:] for name in _NAMES)
        if not (len(paths) == len(keys) == len(shas)) or g.attrs.get("sha256") != _digest(paths, keys, shas):
            return None
    except Exception:  # a damaged cache is only a slower run
        return None
    return paths, keys, shas


def load(group) -> dict[str, tuple[str, str]]:
    """path -> (key, sha256 hex) from a split's cache (empty when absent or damaged)."""
    got = load_arrays(group)
    if got is None:
        return {}
    return {str(p): (str(k), bytes(s).hex()) for p, k, s in zip(*got)}


def lookup(group, items, keys) -> tuple[list, int]:
    """(for each item, its sha256 hex when its stat key matches the cached one, else None; the number of
    entries cached). The items (in a split, sorted by path) and the cache (written sorted) are walked once
    side by side: no dict of a million paths is built."""
    got = load_arrays(group)
    out = [None] * len(items)
    if got is None:
        return out, 0
    paths, cached_keys, shas = got
    j, n = 0, len(paths)
    if any(a.path > b.path for a, b in zip(items, items[1:])):  # not sorted (discover's items always are)
        index = {str(p): j for j, p in enumerate(paths)}
        for i, (item, key) in enumerate(zip(items, keys)):
            k = index.get(item.path)
            if key is not None and k is not None and cached_keys[k] == key:
                out[i] = bytes(shas[k]).hex()
        return out, n
    for i, (item, key) in enumerate(zip(items, keys)):
        path = item.path
        while j < n and paths[j] < path:
            j += 1
        if key is not None and j < n and paths[j] == path and cached_keys[j] == key:
            out[i] = bytes(shas[j]).hex()
    return out, n


def save(group, paths: list[str], keys: list[str], shas: list[str]) -> None:
    """Replace the split's cache with these entries (paths sorted, each with its stat key and sha256 hex)."""
    order = None if all(a < b for a, b in zip(paths, paths[1:])) else sorted(range(len(paths)),
                                                                           key=paths.__getitem__)
    if order is not None:
        paths, keys, shas = ([v[i] for i in order] for v in (paths, keys, shas))
    sha_bytes = np.empty((len(shas), 32), np.uint8)
    for a in range(0, len(shas), 65536):
        part = shas[a : a + 65536]
        sha_bytes[a : a + len(part)] = np.frombuffer(bytes.fromhex("".join(part)), np.uint8).reshape(-1, 32)
    book = bookkeeping(group, create=True)
    if GROUP in book:
        g = book[GROUP]
        g.update_attributes({"sha256": None, "rows": len(paths)})  # invalid until the arrays and digest are in
    else:
        g = book.create_group(GROUP, attributes={"sha256": None, "rows": len(paths)})
    n = len(paths)
    for name, values in zip(_NAMES, (paths, keys, sha_bytes)):
        if name in g:
            arr = writing(g[name])
            arr.resize((n, *arr.shape[1:]))
        elif name == "sha256":
            arr = create_bookkeeping_array(g, name, (n, 32), (65536, 32), "uint8")
        else:
            arr = create_bookkeeping_array(g, name, (n,), (65536,), str)
        if len(paths):
            arr[:] = values if name == "sha256" else np.array(values, dtype=object)
    g.update_attributes({"sha256": _digest(paths, keys, sha_bytes), "rows": len(paths)})
