"""What decoding with torchvision (`extract --decoder torchvision-cpu`, the CPU path of `--decoder nvjpeg`) instead
of Pillow changes: pixels, features and a linear probe's accuracy, paired photo by photo (docs/benchmarks.md,
"JPEGs decoded on the GPU", whose plan this follows).

Two extracts of one split (K = 0) into --work (resumable), one per decoder; then per photo the pixels' mean
absolute difference (both decoders' pixels recomputed here, as the product makes them), the features' cosine, and
the probe: standardised logistic regression (C by an inner 3-fold search), 5-fold stratified outer CV with the
same folds for both arms, for each split seed; the paired difference by seeds-then-photos bootstrap with TOST
against --margin, and McNemar per seed.

    .venv/bin/python experiments/decoder_parity.py --data ../shared/data/cats_and_dogs_small --split train \\
        --model runs/ext.onnx --work runs/decoder_parity -o docs/extract
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np


def one_split(data: str, split: str, dst: Path) -> str:
    """A data root holding only `split` (a link), so that extract runs that split alone."""
    dst.mkdir(parents=True, exist_ok=True)
    link = dst / split
    if not link.exists():
        link.symlink_to(Path(data).resolve() / split)
    return str(dst)


def extract(model: str, data: str, out: Path, decoder: str, quiet: bool) -> dict:
    from convcache.extract.runner import ExtractConfig, run_extract

    s = run_extract(ExtractConfig(model=model, data=data, output=str(out), decoder=decoder, progress=not quiet))
    return {"rows_written": s.rows_written, "decoder": s.decoder, "decodes": s.decodes,
            "decoded_by_decoder": s.decoded_by_decoder, "skipped": len(s.skipped), "seconds": round(s.seconds, 1)}


def pixel_differences(paths: list[str], size: int) -> np.ndarray:
    from convcache.gpudecode import TorchDecoder
    from convcache.imaging import decode_image

    dec, out = TorchDecoder("cpu"), []
    for i in range(0, len(paths), 64):
        datas = [Path(p).read_bytes() for p in paths[i : i + 64]]
        for d, px in zip(datas, dec.decode(datas, size)):
            out.append(np.nan if px is None else float(np.abs(px.astype(int) - decode_image(d, size)).mean()))
    return np.asarray(out)


def probe(X: np.ndarray, y: np.ndarray, seed: int, folds: int) -> np.ndarray:
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    from convcache.protocol import logreg_search

    outer = StratifiedKFold(folds, shuffle=True, random_state=seed)
    return cross_val_predict(logreg_search(3, max_iter=500), X, y, cv=outer) == y


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a split/class tree")
    p.add_argument("--split", default="train")
    p.add_argument("--model", required=True)
    p.add_argument("--work", required=True, help="the two stores (resumable)")
    p.add_argument("-o", "--out", required=True, help="folder for decoder_parity_<date>.json")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--margin", type=float, default=1.0, help="equivalence margin, accuracy points")
    p.add_argument("-q", "--quiet", action="store_true")
    a = p.parse_args(argv)

    from convcache.extract import FeatureStore
    from convcache.runtime import cpu_model
    from convcache.stats import mcnemar_exact, seed_photo_bootstrap

    work = Path(a.work)
    data = one_split(a.data, a.split, work / "data")
    runs = {d: extract(a.model, data, work / f"{d}.zarr", d, a.quiet) for d in ("pillow", "torchvision-cpu")}
    A, B = (FeatureStore(work / f"{d}.zarr").load(a.split) for d in ("pillow", "torchvision-cpu"))
    if A.paths != B.paths:
        raise SystemExit("the two stores hold different photos")
    y = np.asarray(A.label)
    fa, fb = A.features.reshape(len(A), -1).astype(np.float64), B.features.reshape(len(B), -1).astype(np.float64)
    cos = (fa * fb).sum(1) / np.linalg.norm(fa, axis=1) / np.linalg.norm(fb, axis=1)
    paths = A.paths
    if not Path(paths[0]).is_file():  # the store's paths are relative to the data root
        paths = [str(Path(data) / p) for p in paths]
    pix = pixel_differences(paths, FeatureStore(work / "pillow.zarr").extractor(a.split).size)
    ca, cb = [], []
    for seed in range(a.seeds):
        t = time.perf_counter()
        ca.append(probe(fa, y, seed, a.folds))
        cb.append(probe(fb, y, seed, a.folds))
        if not a.quiet:
            print(f"seed {seed}: pillow {ca[-1].mean():.4f}, torchvision {cb[-1].mean():.4f} "
                  f"({time.perf_counter() - t:.0f} s)", flush=True)
    ca, cb = np.asarray(ca, float), np.asarray(cb, float)
    test = seed_photo_bootstrap(100 * ca, 100 * cb, margin=a.margin)
    res = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_model(), "python": platform.python_version(),
           "command": "experiments/decoder_parity.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
           "split": a.split, "photos": len(y), "runs": runs,
           "pixels_mean_abs": {"mean": float(np.nanmean(pix)), "median": float(np.nanmedian(pix)),
                               "p99": float(np.nanpercentile(pix, 99)), "max": float(np.nanmax(pix)),
                               "left_to_pillow": int(np.isnan(pix).sum())},
           "feature_cosine": {"mean": float(cos.mean()), "min": float(cos.min()), "p1": float(np.percentile(cos, 1))},
           "accuracy_pillow": [float(x) for x in ca.mean(1)], "accuracy_torchvision": [float(x) for x in cb.mean(1)],
           "difference_points": test, "mcnemar": [mcnemar_exact(x, z) for x, z in zip(ca, cb)],
           "method": f"standardised logistic regression, C by inner 3-fold search, {a.folds}-fold stratified outer "
                     f"CV, the same folds for both arms, split seeds 0..{a.seeds - 1}; seeds-then-photos bootstrap, "
                     f"TOST at +/-{a.margin} point"}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"decoder_parity_{res['date']}.json"
    path.write_text(json.dumps(res, indent=1))
    print(json.dumps({k: res[k] for k in ("photos", "pixels_mean_abs", "feature_cosine", "accuracy_pillow",
                                         "accuracy_torchvision", "difference_points")}, indent=1))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
