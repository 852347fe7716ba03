"""Image decoding shared by extract and serve, so both see exactly the same pixels.

The way: Pillow opens the bytes; JPEGs decode in draft mode at the smallest DCT scale that
still covers the target size; EXIF orientation is applied; 16-bit images are scaled to 8 bits;
alpha is composited over white; every mode ends as RGB; the image is resized (squashed, as
Keras' `load_img` does) to size x size with bilinear filtering. Output: uint8 HxWx3 RGB.
"""

from __future__ import annotations

import io
import os
import stat
import warnings

import numpy as np
from PIL import Image, ImageOps

from convcache.errors import ImageError

DEFAULT_MAX_PIXELS = 40_000_000  # decompression-bomb guard (PIL's own default is ~89M)
DEFAULT_MAX_BYTES = 64 << 20  # a file larger than this is refused before it is read
DEFAULT_MAX_DECODE_BYTES = 256 << 20  # decoded size (pixels x bytes per pixel of the mode) allowed per image
_CHUNK_ROWS = 256  # high-bit-depth images are converted to 8 bits this many rows at a time
# bytes per pixel of each PIL mode once decoded (what the decoder allocates)
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "LA": 2, "La": 2, "PA": 2, "RGB": 3, "YCbCr": 3, "LAB": 3, "HSV": 3,
               "RGBA": 4, "RGBa": 4, "RGBX": 4, "CMYK": 4, "I": 4, "F": 4, "I;16": 2, "I;16B": 2, "I;16L": 2,
               "I;16N": 2}


def printable_path(path) -> str:
    """A path as text that can always be stored and printed: names that are not valid UTF-8 keep their
    raw bytes as backslash escapes (b'\\xff' -> '\\xff'), so nothing is lost from the report."""
    text = os.fsdecode(path) if isinstance(path, bytes) else str(path)
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
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise ImageError(f"unreadable: {exc.strerror or exc}") from None
    if len(data) > max_bytes:  # it grew while we read it
        raise ImageError(f"file too large: over {max_bytes} bytes")
    return data

def decode_image(data: bytes, size: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES) -> np.ndarray:
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
            return decode_opened(img, size, max_decode_bytes)
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


def decode_opened(img: Image.Image, size: int, max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES) -> np.ndarray:
    """An opened PIL image -> model pixels, the way a file is decoded: JPEGs not yet loaded decode in
    draft mode at the smallest DCT scale covering `size`; EXIF orientation is applied. The decoded
    size (pixels x bytes per pixel of the mode, after draft) is checked before decoding."""
    if img.format == "JPEG" and getattr(img, "tile", None):  # tiles pending: not decoded yet
        img.draft("RGB", (size, size))
    w, h = img.size
    need = w * h * _MODE_BYTES.get(img.mode, 4)  # the first frame only is decoded
    if need > max_decode_bytes:
        raise ImageError(f"decoding needs ~{need >> 20} MiB ({w}x{h} {img.mode}) > {max_decode_bytes >> 20} MiB")
    img.load()
    return prepare_image(ImageOps.exif_transpose(img), size)


def prepare_image(img: Image.Image, size: int) -> np.ndarray:
    """A decoded PIL image -> uint8 size x size x 3 RGB, the model's input."""
    img = _to_rgb(img).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img)
        peak = 65535.0 if arr.max(initial=0) > 255 else 255.0
        out = np.empty(arr.shape, np.uint8)
        for r in range(0, arr.shape[0], _CHUNK_ROWS):  # float64 per slab: same rounding, bounded memory
            out[r : r + _CHUNK_ROWS] = np.clip(arr[r : r + _CHUNK_ROWS] / peak * 255.0 + 0.5, 0, 255)
        del arr
        img = Image.fromarray(out, "L")
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
