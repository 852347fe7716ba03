"""Decode + augment cost per image on one core (the CPU side of an extraction worker), on the shared photos.

    .venv/bin/python bench/bench_decode.py --images 300
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from convcache.augment import AugmentPolicy, augment
from convcache.imaging import decode_image
from convcache.runtime import cpu_model


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="../shared/data/cats_and_dogs_small")
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--size", type=int, default=150)
    args = p.parse_args()
    files = sorted((Path(args.data) / "train" / "cats").glob("*.jpg"))[: args.images]
    blobs = [f.read_bytes() for f in files]
    policy = AugmentPolicy.parse("book")
    t = time.perf_counter()
    images = [decode_image(b, args.size, 40_000_000) for b in blobs]
    decode = (time.perf_counter() - t) / len(blobs)
    t = time.perf_counter()
    for i, im in enumerate(images):
        augment(im, policy, 0, f"{i:064x}", 1)
    aug = (time.perf_counter() - t) / len(images)
    print(json.dumps({"cpu": cpu_model(), "images": len(blobs), "decode_ms": round(1000 * decode, 2),
                      "augment_ms": round(1000 * aug, 2), "per_core_img_per_s": round(1 / (decode + aug), 1)}))


if __name__ == "__main__":
    main()
