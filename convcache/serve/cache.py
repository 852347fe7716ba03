"""A content-addressed LRU cache of inference results, bounded by the bytes it holds (cachetools' `LRUCache`
with a `getsizeof`).

Each entry is stored as its own copies of the arrays: a row of a batch's output is a view that would pin the
whole batch (a 200-entry cache of 256 KiB rows held 1.5 GB that way, issue 30). An entry's size is what it
holds (its arrays' bytes, plus `ENTRY_OVERHEAD` for the key, the tuple and the array headers), so the cache
holds at most `max_bytes` of results whatever their shape."""

from __future__ import annotations

import hashlib
import sys
import threading

import numpy as np
from cachetools import LRUCache

ENTRY_OVERHEAD = 512  # bytes per entry besides its arrays' data: the key string, a tuple, two array headers


def content_key(data: bytes, model_sha256: str) -> str:
    """The image bytes' sha256 joined with the model's: a new model never sees old answers."""
    return f"{model_sha256}:{hashlib.sha256(data).hexdigest()}"


def entry_size(value) -> int:
    """Bytes an entry holds: its arrays' data and a fixed overhead."""
    parts = value if isinstance(value, tuple) else (value,)
    return ENTRY_OVERHEAD + sum(p.nbytes if isinstance(p, np.ndarray) else sys.getsizeof(p) for p in parts)


def _own(value):
    """The value with every array copied out of whatever buffer it views (a batch's output)."""
    if isinstance(value, tuple):
        return tuple(np.array(p, copy=True) if isinstance(p, np.ndarray) else p for p in value)
    return np.array(value, copy=True) if isinstance(value, np.ndarray) else value


class ResultCache:
    """Answers by content key, least recently used first out, at most `max_bytes` held (0 disables it)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._items = LRUCache(maxsize=max(self.max_bytes, 1), getsizeof=entry_size)
        self._lock = threading.Lock()

    def get(self, key: str):
        with self._lock:
            return self._items.get(key)

    def put(self, key: str, value) -> None:
        if self.max_bytes <= 0:
            return
        value = _own(value)
        if entry_size(value) > self.max_bytes:
            return  # larger than the whole budget: never held
        with self._lock:
            self._items[key] = value

    @property
    def nbytes(self) -> int:
        """Bytes held now (entries' arrays plus overhead)."""
        return int(self._items.currsize)

    def __len__(self) -> int:
        return len(self._items)
