"""An idea measured and not adopted: decode each photo in the pass that hashes it (its bytes just read), before
the plan exists, instead of in the rows' phase. At K = 0 the hashing pass keeps 2 threads only ~1.4 cores busy
(GIL hand-offs around short reads and hashes), and the fixed costs between it and the rows' phase run on one;
decoding there would fill that. Null-device extracts of the checkout this runs in (PYTHONPATH=.), as it ships
and with the hashing threads also decoding (the pixels handed to the decode that asks for them), alternating.

    PYTHONPATH=. .venv/bin/python experiments/speculative_decode.py --model runs/ext.onnx \\
        --data ../shared/data/cats_and_dogs_small --images 2000 --augment 0 --rounds 5
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data", default="../shared/data/cats_and_dogs_small")
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--augment", type=int, default=0)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--work", default=tempfile.gettempdir())
    a = p.parse_args(argv)
    import numpy as np

    import convcache.extract.engine as engine
    from convcache import artifacts
    from convcache.benchmarks.extract import subset
    from convcache.extract.mapper import Base
    from convcache.extract.runner import ExtractConfig, run_extract
    from convcache.imaging import decode_image
    from convcache.runtime import cpu_model

    size = artifacts.read(a.model, artifacts.KIND_EXTRACTOR).size
    early: dict = {}  # path -> (sha256, pixels) decoded while hashing
    on = [False]
    keep, decode_base = engine.LocalExecutor._keep, engine.decode_base

    def keep_and_decode(self, item, sha256, data):
        if not on[0]:
            return keep(self, item, sha256, data)
        try:
            early[item.path] = (sha256, decode_image(data, size))
        except Exception:  # left to the rows' phase, which records why
            keep(self, item, sha256, data)

    def decoded_early(item, sha256, spec, copies=(), data=None, matrices=None):
        got = early.pop(item.path, None)
        if got is None or got[0] != sha256:
            return decode_base(item, sha256, spec, copies, data, matrices)
        base = Base(got[1], {})
        if matrices is not None:
            base.matrices = matrices
        else:
            from convcache.extract.mapper import _add_maps
            _add_maps([(base, sha256, copies)], spec)
        return base

    engine.LocalExecutor._keep, engine.decode_base = keep_and_decode, decoded_early
    work = Path(a.work)
    data = work / f"data-{a.images}"
    if not data.exists():
        work.mkdir(parents=True, exist_ok=True)
        subset(a.data, a.images, data)
    out = Path(tempfile.mkdtemp(dir=work))

    def run(name: str):
        early.clear()
        return run_extract(ExtractConfig(model=str(Path(a.model).resolve()), data=str(data), output=str(out / name),
                                         augment=a.augment, progress=False, device="null", workers=2,
                                         decode_in="threads"))

    run("warm.zarr")
    got: dict = {False: [], True: []}
    for r in range(a.rounds):
        for way in ((False, True) if r % 2 == 0 else (True, False)):
            on[0] = way
            got[way].append(run(f"{r}-{way}.zarr").rows_per_second)
    ratios = [b / x for x, b in zip(got[False], got[True])]
    print(f"{a.images} images x {a.augment + 1} copies, device null, 2 workers, threads, {cpu_model()}")
    print(f"as it ships: {', '.join(f'{x:,.0f}' for x in got[False])} rows/s")
    print(f"decoded while hashing: {', '.join(f'{x:,.0f}' for x in got[True])} rows/s")
    print(f"per-round ratio: median {np.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})")


if __name__ == "__main__":
    main()
