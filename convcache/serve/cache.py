"""A bounded, content-addressed LRU cache of inference results."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict


def content_key(data: bytes, model_sha256: str) -> str:
    """The image bytes' sha256 joined with the model's: a new model never sees old answers."""
    return f"{model_sha256}:{hashlib.sha256(data).hexdigest()}"


class ResultCache:
    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self._items: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        return None

    def put(self, key: str, value) -> None:
        if self.max_entries <= 0:
            return
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)
