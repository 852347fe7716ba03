"""Image decoding shared by extract and serve, so both see exactly the same pixels.

The way: Pillow opens the bytes; JPEGs decode in draft mode at the smallest DCT scale that
still covers the target size; EXIF orientation is applied; 16-bit images are scaled to 8 bits;
alpha is composited over white; every mode ends as RGB; the image is resized (squashed, as
Keras' `load_img` does) to size x size with bilinear filtering. Output: uint8 HxWx3 RGB.

Memory: every intermediate is counted (`decode_cost`), not just the decoded frame: Pillow keeps RGB,
LA and the like at 4 bytes a pixel, and orientation, conversion to RGBA, the white background, the
composite and the conversion to RGB each make a copy. An image over `REDUCE_ABOVE` pixels is first
reduced (a box filter, one strip at a time, each strip converted to a mode that can be reduced), so
those copies are made at about 2 Mpx, whatever the file holds; smaller images decode as they always
have (the same pixels). `MemoryBudget` holds a process's decodes at once under a byte budget.
"""

from __future__ import annotations

import io
import math
import os
import stat
import threading
import warnings
from contextlib import contextmanager

import numpy as np
from PIL import Image, ImageOps

from convcache.errors import ImageError

DEFAULT_MAX_PIXELS = 40_000_000  # decompression-bomb guard (PIL's own default is ~89M)
DEFAULT_MAX_BYTES = 64 << 20  # a file larger than this is refused before it is read
DEFAULT_MAX_DECODE_BYTES = 256 << 20  # decoded size (pixels x bytes per pixel of the mode) allowed per image
_CHUNK_ROWS = 256  # high-bit-depth images are converted to 8 bits this many rows at a time
# bytes per pixel of each PIL mode once decoded, as Pillow stores it (RGB, LA, YCbCr, ... use 4)
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
REDUCE_ABOVE = 2_000_000  # pixels: larger images are reduced before orientation, conversion and compositing
_TAIL_BYTES = 20  # bytes a pixel the steps after decoding may hold at once (5 copies at 4 bytes)
_TAIL_BYTES_RGB = 4  # an RGB frame: only an EXIF-oriented one is copied (transposed in place, then swapped)
_FIXED_BYTES = 4 << 20  # the decoder's own buffers, the resized output and the array handed back
_STRIP_BYTES = 8 << 20  # a reduced image's strips: at most about this much each, converted
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}


def mode_bytes(mode: str) -> int:
    return _MODE_BYTES.get(mode, 4)


def reduce_factor(w: int, h: int) -> int:
    return math.ceil(math.sqrt(w * h / REDUCE_ABOVE)) if w * h > REDUCE_ABOVE else 1


def decode_cost(w: int, h: int, mode: str) -> int:
    """Bytes decoding a w x h frame of `mode` holds at its peak, every intermediate counted (an upper
    bound, checked against measured peaks in the tests)."""
    px = w * h
    if px <= REDUCE_ABOVE:  # decoded frame + orientation copy + RGBA, background, composite, RGB
        return px * mode_bytes(mode) + px * (_TAIL_BYTES_RGB if mode == "RGB" else _TAIL_BYTES) + _FIXED_BYTES
    f = reduce_factor(w, h)
    small = math.ceil(w / f) * math.ceil(h / f)
    return px * mode_bytes(mode) + 2 * _STRIP_BYTES + small * (4 + _TAIL_BYTES) + _FIXED_BYTES


def return_freed_memory() -> bool:
    """Make glibc give large freed buffers back to the system at once, so that a budget of decodes at once
    bounds the process's peak RSS: big allocations always mmap'ed (glibc otherwise raises its mmap threshold
    after the first free and keeps such buffers in per-thread arenas), and 2 malloc arenas. Measured with 16
    decode threads under a 256 MiB budget: peak +614 MiB before, +166 MiB after. False where not glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, 1 << 20) and libc.mallopt(-8, 2))  # M_MMAP_THRESHOLD, M_ARENA_MAX
    except (OSError, AttributeError):
        return False


class MemoryBudget:
    """Decodes at once held under `limit` bytes (threads wait for room; one decode larger than the whole
    budget waits until it is alone)."""

    def __init__(self, limit: int):
        self.limit, self.held = limit, 0
        self._cond = threading.Condition()

    @contextmanager
    def hold(self, n: int):
        n = min(n, self.limit)
        with self._cond:
            self._cond.wait_for(lambda: self.held + n <= self.limit)
            self.held += n
        try:
            yield
        finally:
            with self._cond:
                self.held -= n
                self._cond.notify_all()


def printable_path(path) -> str:
    """A path as text that can always be stored and printed: names that are not valid UTF-8 keep their
    raw bytes as backslash escapes (b'\\xff' -> '\\xff'), so nothing is lost from the report."""
    text = os.fsdecode(path) if isinstance(path, bytes) else str(path)
    if text.isascii():  # (the common case, once a row: no encode)
        return text
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def read_bytes(path, max_bytes: int = DEFAULT_MAX_BYTES, storage_options: dict | None = None) -> bytes:
    """A file's bytes, once: refused before reading when it is not a regular file (FIFO, device,
    directory, socket) or larger than `max_bytes`. A URL (s3://...) is read through fsspec."""
    if isinstance(path, str) and "://" in path:
        from convcache.location import read_url

        return read_url(path, max_bytes, storage_options)
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
                    else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "not a regular file")
            raise ImageError(f"not a regular file ({kind})")
        if st.st_size > max_bytes:
            raise ImageError(f"file too large: {st.st_size} bytes > {max_bytes}")
        with open(path, "rb") as f:  # what stat said, and a byte more to see growth: a read of max_bytes + 1
            data = f.read(st.st_size + 1)  # would allocate that much first (~45 µs a photo for 64 MiB)
            if len(data) > st.st_size:  # it grew since stat: read on, still bounded
                data += f.read(max_bytes + 1 - len(data))
    except OSError as exc:
        raise ImageError(f"unreadable: {exc.strerror or exc}") from None
    if len(data) > max_bytes:  # it grew while we read it
        raise ImageError(f"file too large: over {max_bytes} bytes")
    return data

def decode_image(data: bytes, size: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES, budget: MemoryBudget | None = None) -> np.ndarray:
    """Bytes -> model pixels. Every failure, whatever the decoder raises, is an ImageError."""
    if not data:
        raise ImageError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise ImageError(f"too many pixels: {w}x{h} > {max_pixels}")
            return decode_opened(img, size, max_decode_bytes, budget)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"too many pixels: {exc}") from None
    except Image.UnidentifiedImageError:
        raise ImageError("not an image") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"corrupt or truncated image: {exc}") from None
    except MemoryError:
        raise ImageError("out of memory while decoding") from None
    except Exception as exc:  # decoders raise anything (NotImplementedError for odd DDS files, ...)
        raise ImageError(f"undecodable image ({exc.__class__.__name__}: {exc})") from None


def decode_opened(img: Image.Image, size: int, max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES,
                  budget: MemoryBudget | None = None) -> np.ndarray:
    """An opened PIL image -> model pixels, the way a file is decoded: JPEGs not yet loaded decode in
    draft mode at the smallest DCT scale covering `size`; EXIF orientation is applied. What decoding
    will hold at its peak (`decode_cost`) is checked before decoding, and held in `budget` meanwhile."""
    if img.format == "JPEG" and getattr(img, "tile", None):  # tiles pending: not decoded yet
        img.draft("RGB", (size, size))
    w, h = img.size
    need = decode_cost(w, h, img.mode)  # the first frame only is decoded
    if need > max_decode_bytes:
        raise ImageError(f"decoding needs ~{need >> 20} MiB ({w}x{h} {img.mode}, every intermediate counted) > "
                         f"{max_decode_bytes >> 20} MiB")
    with budget.hold(need) if budget is not None else _nothing():
        img.load()
        if w * h <= REDUCE_ABOVE:  # in place: an upright image is not copied (~100 µs a 250 x 188 photo)
            ImageOps.exif_transpose(img, in_place=True)
            return prepare_image(img, size)
        orientation = img.getexif().get(0x0112)
        small = _reduce(img, reduce_factor(w, h))
        if orientation in _TRANSPOSE:
            small = small.transpose(_TRANSPOSE[orientation])
        return prepare_image(small, size)


@contextmanager
def _nothing():
    yield


def _reduce(img: Image.Image, factor: int) -> Image.Image:
    """`img` reduced by `factor` (Pillow's box `reduce`), one strip of rows at a time: each strip is
    converted to a mode that can be reduced (palette -> RGB/RGBA, 16-bit -> 8-bit with the whole image's
    peak, LA -> RGBA, CMYK -> RGB) just before it is reduced, so no full-size copy is ever made."""
    w, h = img.size
    mode = img.mode
    if mode == "P":
        target = "RGBA" if "transparency" in img.info else "RGB"
    elif mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        target = "RGBA"
    elif mode in ("1", "L", "I", "F") or mode.startswith("I;16"):
        target = "L"
    else:
        target = "RGB"
    peak = None
    if mode == "I" or mode.startswith("I;16"):
        peak = 65535.0 if img.getextrema()[1] > 255 else 255.0
    out = Image.new(target, (math.ceil(w / factor), math.ceil(h / factor)))
    rows = factor * max(1, _STRIP_BYTES // (w * 4 * factor))
    for y in range(0, h, rows):
        strip = img.crop((0, y, w, min(h, y + rows)))
        if peak is not None:
            strip = _to_8bit(strip, peak)
        elif mode == "F":
            strip = Image.fromarray(np.clip(np.asarray(strip), 0, 255).astype(np.uint8), "L")
        elif strip.mode != target:
            strip = strip.convert(target)
        out.paste(strip.reduce(factor), (0, y // factor))
    return out


def prepare_image(img: Image.Image, size: int) -> np.ndarray:
    """A decoded PIL image -> uint8 size x size x 3 RGB, the model's input."""
    img = _to_rgb(img).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def _to_8bit(img: Image.Image, peak: float) -> Image.Image:
    """A 16/32-bit integer image as L, scaled by `peak` (65535 when the image's values pass 255, else 255)."""
    arr = np.asarray(img)
    out = np.empty(arr.shape, np.uint8)
    for r in range(0, arr.shape[0], _CHUNK_ROWS):  # float64 per slab: same rounding, bounded memory
        out[r : r + _CHUNK_ROWS] = np.clip(arr[r : r + _CHUNK_ROWS] / peak * 255.0 + 0.5, 0, 255)
    return Image.fromarray(out, "L")


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        img = _to_8bit(img, 65535.0 if img.getextrema()[1] > 255 else 255.0)
    if img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def read_and_decode(path, size: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                    max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[bytes, np.ndarray]:
    data = read_bytes(path, max_bytes)
    return data, decode_image(data, size, max_pixels)
