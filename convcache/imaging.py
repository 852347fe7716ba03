"""Image decoding shared by extract and serve, so both see exactly the same pixels.

The way: Pillow opens the bytes; JPEGs decode in draft mode at the smallest DCT scale that
still covers the target size; EXIF orientation is applied; 16-bit images are scaled to 8 bits;
alpha is composited over white; every mode ends as RGB; the image is resized (squashed, as
Keras' `load_img` does) to size x size with bilinear filtering. Output: uint8 HxWx3 RGB.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

from convcache.errors import ImageError

DEFAULT_MAX_PIXELS = 40_000_000  # decompression-bomb guard (PIL's own default is ~89M)


def decode_image(data: bytes, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    if not data:
        raise ImageError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise ImageError(f"too many pixels: {w}x{h} > {max_pixels}")
            return decode_opened(img, size)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"too many pixels: {exc}") from None
    except Image.UnidentifiedImageError:
        raise ImageError("not an image") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"corrupt or truncated image: {exc}") from None


def decode_opened(img: Image.Image, size: int) -> np.ndarray:
    """An opened PIL image -> model pixels, the way a file is decoded: JPEGs not yet loaded decode in
    draft mode at the smallest DCT scale covering `size`; EXIF orientation is applied."""
    if img.format == "JPEG" and getattr(img, "tile", None):  # tiles pending: not decoded yet
        img.draft("RGB", (size, size))
    img.load()
    return prepare_image(ImageOps.exif_transpose(img), size)


def prepare_image(img: Image.Image, size: int) -> np.ndarray:
    """A decoded PIL image -> uint8 size x size x 3 RGB, the model's input."""
    img = _to_rgb(img).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if arr.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def read_and_decode(path, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[bytes, np.ndarray]:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ImageError(f"unreadable: {exc.strerror or exc}") from None
    return data, decode_image(data, size, max_pixels)
