"""Per-image work, run in worker threads: read, hash, decode, and make the augmented copies."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from convcache.augment import AugmentPolicy, augment
from convcache.errors import ImageError
from convcache.datasets import Item
from convcache.imaging import decode_image


@dataclass
class Hashed:
    item: Item
    sha256: str | None
    error: str | None = None


def hash_file(item: Item) -> Hashed:
    try:
        with open(item.path, "rb") as f:
            return Hashed(item, hashlib.sha256(f.read()).hexdigest())
    except OSError as exc:
        return Hashed(item, None, f"unreadable: {exc.strerror or exc}")


@dataclass
class Decoded:
    item: Item
    sha256: str
    copies: list[int]
    images: list[np.ndarray] | None  # one HxWx3 uint8 per copy
    error: str | None = None


def decode_copies(item: Item, sha256: str, copies: list[int], size: int, policy: AugmentPolicy, seed: int,
                  max_pixels: int) -> Decoded:
    try:
        with open(item.path, "rb") as f:
            data = f.read()
        if hashlib.sha256(data).hexdigest() != sha256:
            return Decoded(item, sha256, copies, None, "changed while reading")
        image = decode_image(data, size, max_pixels)
    except OSError as exc:
        return Decoded(item, sha256, copies, None, f"unreadable: {exc.strerror or exc}")
    except ImageError as exc:
        return Decoded(item, sha256, copies, None, exc.reason)
    return Decoded(item, sha256, copies, [augment(image, policy, seed, sha256, c) for c in copies])
