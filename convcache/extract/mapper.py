"""Per-image work, run in worker threads: read, hash, decode, and make the augmented copies."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from convcache.augment import AugmentPolicy, augment, copy_matrices, warp
from convcache.datasets import Item
from convcache.errors import ImageError
from convcache.imaging import DEFAULT_MAX_BYTES, decode_image, read_bytes


@dataclass(slots=True)
class Hashed:
    item: Item
    sha256: str | None
    error: str | None = None  # the file could not be read
    decode_error: str | None = None  # read and hashed, but it does not decode (probe_file only)


def hash_file(item: Item, max_bytes: int = DEFAULT_MAX_BYTES, storage_options: dict | None = None,
              keep=None) -> Hashed:
    """A file's sha256, or why it could not be read. `keep(item, sha256, data)`, when given, is handed the bytes
    that were hashed (so that the decode need not read and hash them again: `decode_base(..., data=)`)."""
    try:
        data = read_bytes(item.path, max_bytes, storage_options)
        hashed = Hashed(item, hashlib.sha256(data).hexdigest())
        if keep is not None:
            keep(item, hashed.sha256, data)
        return hashed
    except ImageError as exc:
        return Hashed(item, None, exc.reason)
    except Exception as exc:  # one bad file never stops a run
        return Hashed(item, None, f"unreadable ({exc.__class__.__name__}: {exc})")


@dataclass
class Decoded:
    item: Item
    sha256: str
    copies: list[int]
    images: list[np.ndarray] | None  # one HxWx3 uint8 per copy
    error: str | None = None


@dataclass(frozen=True)
class DecodeSpec:
    """How an image becomes its copies' pixels: read (at most `max_bytes`, with `storage_options` for URLs),
    decode to `size` x `size` (at most `max_pixels`), augment copy c by `policy` and `seed`."""

    size: int
    policy: AugmentPolicy
    seed: int = 0
    max_pixels: int = 40_000_000
    max_bytes: int = DEFAULT_MAX_BYTES
    storage_options: dict = field(default_factory=dict)


def read_as_hashed(item: Item, sha256: str, spec: DecodeSpec) -> bytes:
    """The file's bytes, read again; an ImageError if they no longer hash to what the run planned with."""
    data = read_bytes(item.path, spec.max_bytes, spec.storage_options)
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ImageError("changed while reading")
    return data


def decode_copies(item: Item, sha256: str, copies: list[int], spec: DecodeSpec) -> Decoded:
    try:
        image = pixels_of(read_as_hashed(item, sha256, spec), spec)
        h, w = image.shape[:2]
        maps = copy_matrices(spec.policy, spec.seed, [(sha256, c) for c in copies], h, w)
        return Decoded(item, sha256, copies, [warp(image, m, spec.policy) for m in maps])
    except ImageError as exc:
        return Decoded(item, sha256, copies, None, exc.reason)
    except Exception as exc:  # one bad file never stops a run
        return Decoded(item, sha256, copies, None, f"failed ({exc.__class__.__name__}: {exc})")


@dataclass(slots=True)
class Base:
    """An image decoded once: its model-size pixels (copy 0), and the warp maps of the copies asked for (copy ->
    2x3 matrix, `augment.copy_matrices`), or why it could not be decoded."""

    pixels: np.ndarray | None
    matrices: dict
    error: str | None = None


def pixels_of(data: bytes, spec: DecodeSpec) -> np.ndarray:
    """Bytes -> the model-size pixels every copy of the image is warped from (an `ImageError` if they do not
    decode): the one decode of an image, wherever it runs."""
    return decode_image(data, spec.size, spec.max_pixels)


def decode_base(item: Item, sha256: str, spec: DecodeSpec, copies: tuple = (), data: bytes | None = None,
                matrices: dict | None = None, pixels: np.ndarray | None = None) -> Base:
    """An image's model-size pixels, decoded once, and the warp maps of `copies` (every other copy is a warp of
    the pixels: `warp_copy`). Runs in a worker thread or process. `matrices`: the copies' maps computed before
    (`maps_of`, many images at once: the extracting process's decoding threads); without them they are computed
    here, all of this image's at once (numpy under the GIL: in a process it holds no thread of the extracting
    process). `data`: the bytes hashed to `sha256` in this run (read once); without them the file is read, and
    refused if it no longer hashes so. `pixels`: those bytes already decoded (`pixels_of`, in the pass that
    hashed them): nothing is read or decoded."""
    base = Base(pixels, {}) if pixels is not None else _decoded(item, sha256, spec, data)
    if matrices is None:
        add_maps([(base, sha256, copies)], spec)
    elif base.pixels is not None:
        base.matrices = matrices
    return base


def _decoded(item: Item, sha256: str, spec: DecodeSpec, data: bytes | None) -> Base:
    try:
        return Base(pixels_of(read_as_hashed(item, sha256, spec) if data is None else data, spec), {})
    except ImageError as exc:
        return Base(None, {}, exc.reason)
    except Exception as exc:  # one bad file never stops a run
        return Base(None, {}, f"failed ({exc.__class__.__name__}: {exc})")


def watch_parent(pid: int, every: float = 1.0) -> None:
    """A decoding process's initializer: it exits once the extracting process `pid` is gone (or a zombie). A
    process pool's workers otherwise outlive an extract killed with SIGKILL: each holds its call queue's write
    end, so it never reads EOF, and waits for work forever (measured: 2 workers, the forkserver and the resource
    tracker still there long after `kill -9`)."""
    import os
    import threading
    import time

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        try:  # a zombie answers signal 0 until its parent reaps it
            with open(f"/proc/{pid}/stat", "rb") as f:
                return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
        except OSError:
            return False

    def watch():
        while not gone():
            time.sleep(every)
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="convcache-watch-parent").start()


def decode_bases(images: list[tuple[Item, str, tuple]], spec: DecodeSpec) -> list[Base]:
    """`decode_base` for several (item, sha256, copies): a worker process's task. The warp maps of all their
    copies are computed together (at 8 images x 15 copies, ~7x faster than a copy at a time)."""
    bases = [_decoded(item, sha256, spec, None) for item, sha256, _ in images]
    add_maps([(base, sha256, copies) for base, (_, sha256, copies) in zip(bases, images)], spec)
    return bases


def maps_of(images: list[tuple[str, tuple]], spec: DecodeSpec) -> list[dict]:
    """The warp maps (copy -> 2x3 matrix; None for copy 0) of each (sha256, copies), all computed together
    (`augment.copy_matrices`: ~4 µs a copy at 1,000 keys, ~50 at one image's 15). They need no pixels: every
    image is warped at the model's size (`decode_image` resizes it to `spec.size` square)."""
    if not images:  # (a decoding process's start-up task has no spec)
        return []
    maps = iter(copy_matrices(spec.policy, spec.seed, [(sha, c) for sha, copies in images for c in copies],
                              spec.size, spec.size))
    return [{c: next(maps) for c in copies} for _, copies in images]


def add_maps(decoded: list[tuple[Base, str, tuple]], spec: DecodeSpec) -> None:
    """Each decoded image's warp maps for its copies, all computed together (`maps_of`)."""
    ok = [(base, sha256, copies) for base, sha256, copies in decoded if base.pixels is not None]
    for (base, _, _), maps in zip(ok, maps_of([(sha256, copies) for _, sha256, copies in ok], spec)):
        base.matrices = maps


def warp_copy(base: Base | np.ndarray, sha256: str, copy: int, spec: DecodeSpec) -> np.ndarray:
    """Copy `copy` of an image from its decoded pixels (the same bytes `decode_copies` gives), with the map
    `decode_base` computed for it when there is one."""
    if isinstance(base, Base):
        if copy in base.matrices:
            return warp(base.pixels, base.matrices[copy], spec.policy)
        base = base.pixels
    return augment(base, spec.policy, spec.seed, sha256, copy)


def probe_file(item: Item, size: int, max_pixels: int, max_bytes: int = DEFAULT_MAX_BYTES,
               storage_options: dict | None = None) -> Hashed:
    """hash_file plus a full decode: the distributed planner must know, before it assigns rows to
    tasks, which files will decode (a task fills whole chunks, so a row cannot go missing later)."""
    try:
        data = read_bytes(item.path, max_bytes, storage_options)
    except ImageError as exc:
        return Hashed(item, None, exc.reason)
    except Exception as exc:  # one bad file never stops a run
        return Hashed(item, None, f"unreadable ({exc.__class__.__name__}: {exc})")
    hashed = Hashed(item, hashlib.sha256(data).hexdigest())
    try:
        decode_image(data, size, max_pixels)
    except ImageError as exc:
        hashed.decode_error = exc.reason
    except Exception as exc:
        hashed.decode_error = f"failed ({exc.__class__.__name__}: {exc})"
    return hashed
