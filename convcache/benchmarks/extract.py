"""The whole extract pipeline (decode, augment, infer, write) against bare ORT inference on
pre-decoded arrays, in one run on the same images; and the store's size for float32 and float16.

    .venv/bin/convcache bench extract --data ../shared/data/cats_and_dogs_small --images 300 --augment 2
    .venv/bin/convcache bench extract --model runs/rt/block5-int8.onnx --device cpu --dtypes float32

`--model` measures an exported extractor (an int8 one, say) instead of exporting `--weights`; `--device`
is the runtime of both the bare and the pipeline rate.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from convcache.augment import AugmentPolicy, augment
from convcache.datasets import discover
from convcache.export.runner import export_extractor
from convcache.extract.engine import ExtractorSession
from convcache.extract.runner import ExtractConfig, run_extract
from convcache.imaging import read_and_decode


def subset(data: str, n: int, dst: Path) -> Path:
    """Symlinks to the first n/2 train images of each class (the original files are not copied)."""
    items, classes = discover(data)
    for label, name in enumerate(classes):
        picked = [i for i in items if i.split == "train" and i.label == label][: n // len(classes)]
        (dst / "train" / name).mkdir(parents=True)
        for item in picked:
            (dst / "train" / name / Path(item.path).name).symlink_to(Path(item.path).resolve())
    return dst


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="convcache bench extract", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/cats_and_dogs_small")
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--augment", type=int, default=2)
    p.add_argument("--weights", default="hed")
    p.add_argument("--size", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--model", help="an exported extractor (default: export --weights)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--dtypes", nargs="+", default=["float32", "float16"])
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--stub", type=float, metavar="ROWS_PER_S",
                   help="instead: the pipeline with inference replaced by a sleep at this rate (no CPU), to show "
                        "what the pipeline's structure reaches and its CPU time per row outside inference")
    a = p.parse_args(argv)
    if a.stub:
        return stub(a)
    tmp = Path(tempfile.mkdtemp())
    data = subset(a.data, a.images, tmp / "data")
    model = Path(a.model) if a.model else tmp / "extractor.onnx"
    if not a.model:
        export_extractor(a.weights, a.size, str(model))

    # Bare: the same rows, decoded and augmented beforehand, straight through session.run.
    extractor = ExtractorSession(str(model), a.device)
    items, _ = discover(str(data))
    rows = []
    for item in items:
        raw, pixels = read_and_decode(item.path, a.size)
        import hashlib

        sha = hashlib.sha256(raw).hexdigest()
        rows += [augment(pixels, AugmentPolicy(), 0, sha, c) for c in range(a.augment + 1)]
    batch = np.stack(rows).astype(np.float32)
    extractor(batch[: a.batch_size])  # warm-up

    def bare_rate() -> float:
        t = time.perf_counter()
        for i in range(0, len(batch), a.batch_size):
            extractor(batch[i : i + a.batch_size])
        return len(batch) / (time.perf_counter() - t)

    # interleaved rounds: bare, then each pipeline run into a fresh store; the ratio is per round
    bare, results = [], {dtype: [] for dtype in a.dtypes}
    for r in range(a.rounds):
        bare.append(bare_rate())
        for dtype in a.dtypes:
            store = tmp / f"{dtype}-{r}.zarr"
            s = run_extract(ExtractConfig(model=str(model), data=str(data), output=str(store), augment=a.augment,
                                          batch_size=a.batch_size, dtype=dtype, progress=False, device=a.device,
                                          workers=a.workers))
            results[dtype].append((s.rows_written, s.rows_per_second, du(store), s.provider))
    from convcache.runtime import cpu_model

    print(f"{len(batch)} rows ({len(items)} images x {a.augment + 1} copies) at {a.size}x{a.size}, "
          f"batch {a.batch_size}, {a.model or a.weights}, device {a.device} ({extractor.provider}), "
          f"{a.workers} decode workers, {a.rounds} interleaved rounds, {cpu_model()}\n")
    print("| what | rows/s (median) | vs bare (median of per-round ratios) | rounds | store size | bytes/row |")
    print("|---|---|---|---|---|---|")
    print(f"| bare inference on pre-decoded arrays | {np.median(bare):.1f} | 1.00x | "
          f"{', '.join(f'{x:.1f}' for x in bare)} | | |")
    for dtype, runs in results.items():
        rates = [x[1] for x in runs]
        ratio = np.median([x / b for x, b in zip(rates, bare)])
        n, size = runs[-1][0], runs[-1][2]
        print(f"| full pipeline, {dtype} store | {np.median(rates):.1f} | {ratio:.2f}x | "
              f"{', '.join(f'{x:.1f}' for x in rates)} | {size / 2**20:.1f} MiB | {size / n:,.0f} |")


def stub(a) -> None:
    import resource

    import convcache.extract.engine as engine
    from convcache.runtime import cpu_model

    tmp = Path(tempfile.mkdtemp())
    data = subset(a.data, a.images, tmp / "data")
    model = a.model or str(tmp / "extractor.onnx")
    if not a.model:
        export_extractor(a.weights, a.size, model)
    items, _ = discover(str(data))  # real features of real photos, so the store compresses as it would
    sample = engine.ExtractorSession(model, "cpu")(np.stack([read_and_decode(i.path, a.size)[1]
                                                      for i in items[: a.batch_size]]))

    def sleep_instead(self, images):
        self.calls += 1
        time.sleep(len(images) / a.stub)
        return sample[np.arange(len(images)) % len(sample)]

    engine.ExtractorSession.__call__ = sleep_instead
    for r in range(a.rounds):
        before = resource.getrusage(resource.RUSAGE_SELF)
        s = run_extract(ExtractConfig(model=model, data=str(data), output=str(tmp / f"stub-{r}.zarr"),
                                      augment=a.augment, batch_size=a.batch_size, progress=False, workers=a.workers))
        after = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        print(f"stubbed inference at {a.stub:g} rows/s ({cpu_model()}): pipeline {s.rows_per_second:.1f} rows/s = "
              f"{s.rows_per_second / a.stub:.3f} of it; {1000 * cpu / s.rows_written:.2f} CPU ms per row outside "
              f"inference ({s.rows_written} rows, {a.augment + 1} copies)")


if __name__ == "__main__":
    main()
