"""Two figures behind `convcache/gpudecode.py` (docs/benchmarks.md, "JPEGs decoded on the GPU"), on real photos:

1. the header read a photo: the marker walk (`gpudecode.header`) against Pillow's parser (`_pillow_header`), the
   two timed alternately, --rounds rounds over the same photos, and whether they agree on every photo;
2. (with torchvision) the pixels against Pillow's (`imaging.decode_image`), mean absolute difference a photo of 255,
   with the draft-mode block average as shipped and without it (the reduction set to 1): why it is there.

    PYTHONPATH=/path/to/torch/site .venv/bin/python experiments/bench_gpudecode_micro.py \\
        --data ../shared/data/cats_and_dogs_small --split train --rounds 5
"""

from __future__ import annotations

import argparse
import glob
import time
from pathlib import Path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/cats_and_dogs_small")
    p.add_argument("--split", default="train")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--size", type=int, default=150)
    a = p.parse_args(argv)
    import numpy as np

    from convcache import gpudecode
    from convcache.imaging import decode_image
    from convcache.runtime import cpu_model

    files = sorted(glob.glob(str(Path(a.data) / a.split / "*" / "*.jpg")))
    datas = [Path(f).read_bytes() for f in files]
    print(f"{len(files)} photos of {a.data}/{a.split}; {cpu_model()}")
    walk, pillow = [], []
    for _ in range(a.rounds):
        for fn, out in ((gpudecode.header, walk), (gpudecode._pillow_header, pillow)):
            t = time.perf_counter()
            for d in datas:
                fn(d, 40_000_000)
            out.append(1e6 * (time.perf_counter() - t) / len(datas))
    agree = sum(gpudecode.header(d, 40_000_000) == gpudecode._pillow_header(d, 40_000_000) for d in datas)
    print(f"header, us a photo over {a.rounds} alternating rounds: marker walk {np.median(walk):.1f} "
          f"({min(walk):.1f}-{max(walk):.1f}); Pillow's parser {np.median(pillow):.1f} ({min(pillow):.1f}-"
          f"{max(pillow):.1f}); the same answer for {agree} of {len(datas)} photos")
    why = gpudecode.unavailable("cpu")
    if why:
        print(f"pixels: not measured ({why})")
        return
    dec = gpudecode.TorchDecoder("cpu")
    ref = [decode_image(d, a.size) for d in datas]

    def diffs() -> np.ndarray:
        got = [px for i in range(0, len(datas), 64) for px in dec.decode(datas[i : i + 64], a.size)]
        return np.array([np.abs(g.astype(int) - r).mean() for g, r in zip(got, ref)])

    shipped = diffs()
    real = gpudecode.draft_scale
    gpudecode.draft_scale = lambda w, h, size: 1
    try:
        plain = diffs()
    finally:
        gpudecode.draft_scale = real
    for name, d in (("as shipped (block average of the draft factor)", shipped), ("without the block average", plain)):
        print(f"pixels vs Pillow, {name}: mean {d.mean():.3f} of 255 a photo, median {np.median(d):.3f}, "
              f"worst {d.max():.3f}")


if __name__ == "__main__":
    main()
