"""Decode (+ resize) and augment cost per image on the shared photos, decoders and worker kinds side
by side in one run (interleaved rounds):

- pillow-draft: what extract does today (`convcache.imaging.decode_image`: Pillow, JPEG draft mode at
  the smallest DCT scale covering the target, EXIF orientation, bilinear resize);
- simplejpeg / turbojpeg (PyTurboJPEG, needs the system libturbojpeg): libjpeg-turbo decoding straight
  to the smallest scale n/8 covering the target (more scales than Pillow's draft, which only halves),
  then the same Pillow resize: fewer pixels decoded, different pixels;
- "... at Pillow's scale": the same libraries decoding at the power-of-two scale draft picks, then the
  same resize: the pixels of today's path, if the libraries agree.
Pixels are compared against pillow-draft (max abs difference, share of identical images). Then the
product's decode path on 1 and 2 thread workers vs 1 and 2 process workers (images per second).

    .venv/bin/python experiments/bench_decode.py --images 400
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from convcache.augment import AugmentPolicy, augment
from convcache.imaging import decode_image
from convcache.runtime import cpu_model

SIZE = 150


def pillow_draft(data: bytes) -> np.ndarray:
    return decode_image(data, SIZE)


def _resize(arr: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(arr).resize((SIZE, SIZE), Image.Resampling.BILINEAR))


def simplejpeg_decode(data: bytes) -> np.ndarray:
    import simplejpeg

    return _resize(simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=SIZE, min_height=SIZE))


_TJ = None


def _turbo():
    global _TJ
    from turbojpeg import TurboJPEG

    if _TJ is None:
        _TJ = TurboJPEG()
    return _TJ


def turbojpeg_decode(data: bytes) -> np.ndarray:
    from turbojpeg import TJPF_RGB

    _turbo()
    w, h = Image.open(io.BytesIO(data)).size  # header only
    # the smallest of libjpeg-turbo's scales (n/8) that still covers SIZE on both sides, as draft picks
    scale = next((f for f in ((1, 8), (1, 4), (3, 8), (1, 2), (5, 8), (3, 4), (7, 8), (1, 1))
                  if -(-w * f[0] // f[1]) >= SIZE and -(-h * f[0] // f[1]) >= SIZE), (1, 1))
    return _resize(_TJ.decode(data, pixel_format=TJPF_RGB, scaling_factor=scale))


def pillow_scale(w: int, h: int) -> int:
    """The reduction Pillow's draft picks: the largest of 8, 4, 2, 1 that keeps both sides >= SIZE."""
    s = min(w // SIZE, h // SIZE)
    return next(d for d in (8, 4, 2, 1) if s >= d or d == 1)


def simplejpeg_pillow_scale(data: bytes) -> np.ndarray:
    import simplejpeg

    h, w, _, _ = simplejpeg.decode_jpeg_header(data)
    d = pillow_scale(w, h)
    return _resize(simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=-(-w // d), min_height=-(-h // d)))


def turbojpeg_pillow_scale(data: bytes) -> np.ndarray:
    from turbojpeg import TJPF_RGB

    w, h = _turbo().decode_header(data)[:2]
    return _resize(_TJ.decode(data, pixel_format=TJPF_RGB, scaling_factor=(1, pillow_scale(w, h))))


def available() -> dict:
    out = {"pillow-draft": pillow_draft}
    try:
        import simplejpeg  # noqa: F401

        out["simplejpeg"] = simplejpeg_decode
        out["simplejpeg at Pillow's scale"] = simplejpeg_pillow_scale
    except ImportError:
        print("simplejpeg: not installed (pip install simplejpeg)")
    try:
        turbojpeg_decode(_tiny_jpeg())
        out["turbojpeg"] = turbojpeg_decode
        out["turbojpeg at Pillow's scale"] = turbojpeg_pillow_scale
    except Exception as exc:  # PyTurboJPEG missing, or no system libturbojpeg
        print(f"turbojpeg: unavailable ({exc.__class__.__name__}: {str(exc).splitlines()[0]})")
    return out


def _tiny_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (300, 300), (10, 20, 30)).save(buf, "JPEG")
    return buf.getvalue()


def per_image_ms(fn, blobs) -> float:
    t = time.perf_counter()
    for b in blobs:
        fn(b)
    return 1000 * (time.perf_counter() - t) / len(blobs)


def pool_rate(kind: str, workers: int, blobs) -> float:
    ex = (ThreadPoolExecutor if kind == "threads" else ProcessPoolExecutor)(workers)
    with ex:
        list(ex.map(pillow_draft, blobs[:workers * 2]))  # start the workers
        t = time.perf_counter()
        list(ex.map(pillow_draft, blobs, chunksize=1 if kind == "threads" else 16))
        return len(blobs) / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="../shared/data/cats_and_dogs_small")
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    files = sorted((Path(args.data) / "train").glob("*/*.jpg"))
    files = files[:: max(1, len(files) // args.images)][: args.images]
    blobs = [f.read_bytes() for f in files]
    decoders = available()
    reference = [pillow_draft(b) for b in blobs]
    pixels = {}
    for name, fn in decoders.items():
        diffs = [int(np.abs(fn(b).astype(int) - r).max()) for b, r in zip(blobs, reference)]
        pixels[name] = {"max_abs": max(diffs), "identical_share": float(np.mean([d == 0 for d in diffs]))}
    ms = {name: [] for name in decoders}
    pools = {f"{kind} x{w}": [] for kind in ("threads", "processes") for w in (1, 2)}
    for _ in range(args.rounds):
        for name, fn in decoders.items():
            ms[name].append(per_image_ms(fn, blobs))
        for key in pools:
            kind, w = key.split(" x")
            pools[key].append(pool_rate(kind, int(w), blobs))
    policy = AugmentPolicy.parse("book")
    t = time.perf_counter()
    for i, im in enumerate(reference):
        augment(im, policy, 0, f"{i:064x}", 1)
    aug = 1000 * (time.perf_counter() - t) / len(reference)
    out = {"cpu": cpu_model(), "images": len(blobs), "size": SIZE, "augment_ms": round(aug, 2),
           "decode_ms_median": {k: round(statistics.median(v), 3) for k, v in ms.items()},
           "decode_ms_rounds": {k: [round(x, 3) for x in v] for k, v in ms.items()},
           "vs_pillow_draft": {k: round(statistics.median(ms["pillow-draft"]) / statistics.median(v), 2)
                               for k, v in ms.items()},
           "pixels_vs_pillow_draft": pixels,
           "pool_img_per_s_median": {k: round(statistics.median(v), 1) for k, v in pools.items()},
           "pool_img_per_s_rounds": {k: [round(x, 1) for x in v] for k, v in pools.items()}}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
