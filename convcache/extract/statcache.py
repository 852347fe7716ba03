"""The stat cache: (path, stat key) -> sha256 of the file's bytes, kept in each split of the store, so a
re-run on unchanged data reads no image (git's index and DVC's state database work the same way).

A file's **stat key** is what changes whenever its bytes may have: on disk its size, mtime_ns, ctime_ns and
inode (a file replaced by another with the same size and mtime has a new inode, and its ctime moves;
`touch` moves mtime); on object storage its size, ETag and version from the listing. A cached hash is
trusted only while the whole key matches; anything else is hashed again. A file whose mtime lies within
`datasets.RACY_SECONDS` of the moment it was stat'ed is never cached ("racily clean", as git calls it: it could
change again within the file system's timestamp granularity and keep its key), so it is hashed next time.

It lives in the split's `stat_cache` group (arrays `path`, `key`, `sha256`), written whole at the end of a
split's run, with a digest of its contents as an attribute: a cache that does not match its digest (a run
killed while writing it) is ignored, never trusted. It is an input cache, outside the store's digests and
seal: deleting it only costs a re-hash. `extract --rehash` ignores it and writes it afresh.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

from convcache.datasets import local_key

GROUP = "stat_cache"
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
    h = hashlib.sha256()
    h.update("\0".join(paths).encode("utf-8", "surrogatepass"))
    h.update(b"\1" + "\0".join(keys).encode())
    h.update(b"\1" + np.ascontiguousarray(shas, np.uint8).tobytes())
    return h.hexdigest()


def load(group) -> dict[str, tuple[str, str]]:
    """path -> (key, sha256 hex) from a split's cache; empty when absent, unreadable or not its digest."""
    try:
        if GROUP not in group:
            return {}
        g = group[GROUP]
        paths, keys, shas = (g[name][:] for name in _NAMES)
        paths, keys = [str(p) for p in paths], [str(k) for k in keys]
        if not (len(paths) == len(keys) == len(shas)) or g.attrs.get("sha256") != _digest(paths, keys, shas):
            return {}
    except Exception:  # a damaged cache is only a slower run
        return {}
    return {p: (k, bytes(s).hex()) for p, k, s in zip(paths, keys, shas)}


def save(group, entries: dict[str, tuple[str, str]]) -> None:
    """Replace the split's cache with `entries` (path -> (key, sha256 hex))."""
    paths = sorted(entries)
    keys = [entries[p][0] for p in paths]
    shas = np.frombuffer(b"".join(bytes.fromhex(entries[p][1]) for p in paths), np.uint8).reshape(-1, 32)
    g = group[GROUP] if GROUP in group else group.create_group(GROUP)
    g.update_attributes({"sha256": None, "rows": len(paths)})  # invalid until the arrays and the digest are in
    for name, values in zip(_NAMES, (paths, keys, shas)):
        if name in g:
            arr = g[name]
        elif name == "sha256":
            arr = g.create_array(name, shape=(0, 32), chunks=(65536, 32), dtype="uint8")
        else:
            arr = g.create_array(name, shape=(0,), chunks=(65536,), dtype=str)
        arr.resize((len(paths), *arr.shape[1:]))
        if len(paths):
            arr[:] = values if name == "sha256" else np.array(values, dtype=object)
    g.update_attributes({"sha256": _digest(paths, keys, shas), "rows": len(paths)})
