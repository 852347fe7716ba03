"""The whole extract pipeline (decode, augment, infer, write) against bare ORT inference on
pre-decoded arrays, in one run on the same images; and the store's size for float32 and float16.

    .venv/bin/convcache bench extract --data ../shared/data/cats_and_dogs_small --images 300 --augment 2
    .venv/bin/convcache bench extract --model runs/rt/block5-int8.onnx --device cpu --dtypes float32

`--model` measures an exported extractor (an int8 one, say) instead of exporting `--weights`; `--device`
is the runtime of both the bare and the pipeline rate. `--device null` takes the runtime out: the input
pipeline's own rows/s against Pillow's decode rate on the same cores, in one run:

    .venv/bin/convcache bench extract --device null --images 1000 --augment 10 --rounds 2
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
from convcache.runtime import available_cores


def subset(data: str, n: int, dst: Path) -> Path:
    """Symlinks to the first n/2 train images of each class (the original files are not copied)."""
    items, classes = discover(data)
    for label, name in enumerate(classes):
        picked = [i for i in items if i.split == "train" and i.label == label][: n // len(classes)]
        (dst / "train" / name).mkdir(parents=True)
        for item in picked:
            (dst / "train" / name / Path(item.path).name).symlink_to(Path(item.path).resolve())
    return dst


def cached_subset(data: str, n: int, work: Path) -> Path:
    """`subset` of n photos under `work` (data-N), made once and reused by later runs there."""
    dst = Path(work) / f"data-{n}"
    if not dst.exists():
        Path(work).mkdir(parents=True, exist_ok=True)
        subset(data, n, dst)
    return dst


def subset_arguments(p: argparse.ArgumentParser, images: int, augment: int, rounds: int,
                     rounds_flag: str = "--rounds", model_help: str | None = None) -> None:
    """What the extract experiments (experiments/gil_ceiling.py, run_phases.py, session_overlap.py) take alike: an
    extractor, the photos (a `cached_subset` of --images of --data, under --work), copies, workers, rounds."""
    p.add_argument("--model", required=True, help=model_help)
    p.add_argument("--data", default="../shared/data/cats_and_dogs_small")
    p.add_argument("--images", type=int, default=images)
    p.add_argument("--augment", type=int, default=augment)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument(rounds_flag, type=int, default=rounds)
    p.add_argument("--work", default=tempfile.gettempdir(), help="where the photo subset and the stores go")


def subset_and_output(a: argparse.Namespace) -> tuple[Path, Path]:
    """(the photo subset `subset_arguments` asked for, a new folder for the stores), both under --work."""
    work = Path(a.work)
    data = cached_subset(a.data, a.images, work)
    return data, Path(tempfile.mkdtemp(dir=work))


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
    p.add_argument("--device", default="cpu",
                   help="auto, cpu, cuda, openvino; or null: no inference, the input pipeline against Pillow's "
                        "decode rate on the same cores")
    p.add_argument("--workers", type=int, default=available_cores())
    p.add_argument("--dtypes", nargs="+", default=["float32", "float16"])
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--decoder", choices=["nvjpeg", "torchvision-cpu"],
                   help="device null: one arm more, JPEGs decoded by torchvision (nvjpeg: on the GPU)")
    a = p.parse_args(argv)
    if a.device == "null":
        return null(a)
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


QUARTER = "as it ships, a quarter of the photos"


def _decode_file(path: str, size: int) -> int:
    read_and_decode(path, size)
    return 1


def _plain(path: str, size: int) -> np.ndarray:
    """What a user would write with Pillow alone: open, draft, RGB, resize, an array (no EXIF, no checks). The
    same pixels as convcache's decode for an upright RGB JPEG (the bench counts how many are)."""
    from PIL import Image

    with Image.open(path) as im:
        im.draft("RGB", (size, size))
        return np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))


def _plain_file(path: str, size: int) -> int:
    _plain(path, size)
    return 1


def null(a) -> None:
    """The input pipeline's own ceiling (issue 29), on this machine's cores, in one run: the runtime replaced
    by the `null` device (zeros of the right shape; real reads, hashes, decodes, warps and store writes),
    against Pillow's decode + resize rate on the same files, in one process and in `--workers` processes.
    The pipeline is run as it ships (each image decoded once; `--decode-in auto`, which decodes in threads
    below PROCESS_MIN_WORKERS workers, in processes from there on: the row names which it took), and with
    each choice made both ways: threads or processes; the decode cache or none (every copy decoded, as
    before issue 29). A stricter peer beside it: plain Pillow (open, draft, RGB, resize: no EXIF, no checks). And
    as it ships on a quarter of the photos, so that each round also gives the marginal rate (the rows the larger
    run adds over the seconds it adds: the per-row cost, the run's fixed costs out) and those fixed seconds."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from convcache.runtime import cpu_model
    from convcache.stats import marginal_rate

    tmp = Path(tempfile.mkdtemp())
    data = subset(a.data, a.images, tmp / "data")
    model = a.model or str(tmp / "extractor.onnx")
    if not a.model:
        export_extractor(a.weights, a.size, model)
    items, _ = discover(str(data))
    paths = [i.path for i in items]
    quarter = subset(str(data), a.images // 4, tmp / "quarter")  # the fixed costs out: see "marginal" below
    same = sum(np.array_equal(_plain(p, a.size), read_and_decode(p, a.size)[1]) for p in paths)

    def pillow(workers: int, fn=_decode_file) -> float:
        """Pillow's decode + resize rate (convcache's decode, or `_plain`): in this process, or in `workers`
        processes started and warmed (each has decoded a photo) before the clock starts, so the peer's rate
        carries no start-up."""
        if workers == 1:
            t = time.perf_counter()
            for p in paths:
                fn(p, a.size)
            return len(paths) / (time.perf_counter() - t)
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver")) as ex:
            list(ex.map(fn, paths[: 2 * workers], [a.size] * 2 * workers))  # every process up
            t = time.perf_counter()
            list(ex.map(fn, paths, [a.size] * len(paths), chunksize=8))
            return len(paths) / (time.perf_counter() - t)

    arms = {"as it ships": {"decode_in": "auto"},
            "decode once, processes": {"decode_in": "processes"},
            "decode once, threads": {"decode_in": "threads"},
            "every copy decoded, processes": {"decode_in": "processes", "decode_cache_mb": 0},
            "every copy decoded, threads (before issue 29)": {"decode_in": "threads", "decode_cache_mb": 0}}
    if a.decoder:  # torchvision's decoder (nvJPEG on a GPU) in place of Pillow's
        arms[f"--decoder {a.decoder}"] = {"decoder": a.decoder}
    plain = f"plain Pillow (open, draft, RGB, resize), {a.workers} processes"
    got = {"pillow, 1 process": [], f"pillow, {a.workers} processes": [], plain: [], **{k: [] for k in arms}}
    decodes, shipped, seconds = {}, "", {}

    def extract(r: int, name: str, kw: dict, photos: Path = data) -> float:
        nonlocal shipped
        out = tmp / f"null-{r}-{len(list(tmp.glob('null-*')))}.zarr"
        s = run_extract(ExtractConfig(model=model, data=str(photos), output=str(out), augment=a.augment,
                                      batch_size=a.batch_size, progress=False, device="null",
                                      workers=a.workers, **kw))
        decodes[name] = s.decodes
        shipped = s.decode_in if name == "as it ships" else shipped
        seconds.setdefault(name, []).append((s.rows_written, s.seconds))
        return s.rows_per_second

    runs = {"pillow, 1 process": lambda r: pillow(1), f"pillow, {a.workers} processes": lambda r: pillow(a.workers),
            plain: lambda r: pillow(a.workers, _plain_file),
            **{name: (lambda r, name=name, kw=kw: extract(r, name, kw)) for name, kw in arms.items()},
            QUARTER: lambda r: extract(r, QUARTER, {"decode_in": "auto"}, quarter)}
    order = list(runs)
    run_extract(ExtractConfig(model=model, data=str(quarter), output=str(tmp / "warm-up.zarr"), augment=a.augment,
                              batch_size=a.batch_size, progress=False, device="null", workers=a.workers))
    for r in range(a.rounds):  # after a warm-up (imports, first calls); the order rotates round to round
        for name in order[r % len(order):] + order[: r % len(order)]:
            got.setdefault(name, []).append(runs[name](r))
    # marginal: the rate of the rows a larger run adds, (rows - rows of a quarter) / (seconds - its seconds), per
    # round: the per-row cost with the run's fixed costs (model identity, creating the store, the listing and stat
    # cache, the last commit) taken out; their seconds are the line's intercept
    lines = [marginal_rate(*whole, *part) for whole, part in zip(seconds["as it ships"], seconds[QUARTER])]
    got["as it ships, marginal (fixed costs out)"] = [rate for rate, _ in lines]
    fixed = [f for _, f in lines]
    label = f"as it ships (decode_in auto: {shipped})"
    got = {label if k == "as it ships" else k: v for k, v in got.items()}
    decodes = {label if k == "as it ships" else k: v for k, v in decodes.items()}
    ref, strict = got[f"pillow, {a.workers} processes"], got[plain]
    rows = len(paths) * (a.augment + 1)
    print(f"{len(paths)} images x {a.augment + 1} copies = {rows} rows at {a.size}x{a.size}, device null (no "
          f"inference), {a.workers} workers, batch {a.batch_size}, {a.rounds} rounds, the order rotating round to "
          f"round, {cpu_model()}; plain Pillow gives convcache's pixels for {same} of the {len(paths)} photos; the "
          f"run's fixed costs (intercept): {np.median(fixed):.2f} s (median; {min(fixed):.2f}-{max(fixed):.2f})\n")
    print(f"| what | images or rows/s (median) | vs Pillow in {a.workers} processes: median of per-round ratios "
          f"(lowest-highest) | vs plain Pillow in {a.workers} processes | rounds | decodes |")
    print("|---|---|---|---|---|---|")
    for name, rates in got.items():
        unit = "images" if name.startswith(("pillow", "plain")) else "rows"
        ratios = [x / y for x, y in zip(rates, ref)]
        strict_ratios = [x / y for x, y in zip(rates, strict)]
        print(f"| {name} | {np.median(rates):,.0f} {unit}/s | {np.median(ratios):.2f}x ({min(ratios):.2f}-"
              f"{max(ratios):.2f}) | {np.median(strict_ratios):.2f}x ({min(strict_ratios):.2f}-"
              f"{max(strict_ratios):.2f}) | {', '.join(f'{x:,.0f}' for x in rates)} | {decodes.get(name, '')} |")

if __name__ == "__main__":
    main()
