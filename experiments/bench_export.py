"""Extractor throughput at 150x150, one run, same weights: ORT CPU vs Keras predict, int8 vs fp32.

    .venv/bin/python experiments/bench_export.py --weights hed --data ../shared/data/cats_and_dogs_small
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from convcache.artifacts.metadata import load_model
from convcache.backbone import keras_model, weights
from convcache.export.quantize import cosine_report, load_calibration, split_held_out, to_int8
from convcache.export.runner import export_extractor


def rate(fn, images: np.ndarray, batch: int, seconds: float) -> float:
    fn(images[:batch])  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        i = (done % len(images)) // batch * batch
        chunk = images[i : i + batch]
        if len(chunk) < batch:
            chunk = images[:batch]
        fn(chunk)
        done += batch
    return done / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--weights", default="hed")
    p.add_argument("--size", type=int, default=150)
    p.add_argument("--data", default="../shared/data/cats_and_dogs_small")
    p.add_argument("--seconds", type=float, default=20)
    a = p.parse_args()

    images = load_calibration(str(Path(a.data) / "validation"), a.size, limit=120)
    calib, held = split_held_out(images)
    tmp = Path(tempfile.mkdtemp())
    export_extractor(a.weights, a.size, str(tmp / "fp32.onnx"))
    fp32 = load_model(tmp / "fp32.onnx")
    variants = {"fp32": fp32}
    for name, kw in {"int8 per-channel, first conv fp32, minmax": {"exclude_last_conv": False},
                     "int8 per-channel, first conv fp32, percentile": {"exclude_last_conv": False,
                                                                       "method": "percentile"},
                     "int8 per-channel, first+last conv fp32, minmax (default)": {},
                     "int8 per-tensor, all convs, minmax": {"per_channel": False, "exclude_first_conv": False,
                                                            "exclude_last_conv": False}}.items():
        variants[name] = to_int8(fp32, calib, **kw)

    keras_extractor = keras_model.build_extractor(weights.load_vgg16(a.weights, a.size))
    rows = []
    for batch in (1, 32):
        k = rate(lambda x: keras_extractor.predict(x, verbose=0), images, batch, a.seconds)
        rows.append((f"Keras predict, batch {batch}", k, None))
        for name, proto in variants.items():
            s = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
            r = rate(lambda x, s=s: s.run(None, {"images": x}), images, batch, a.seconds)
            cos = None if name == "fp32" else cosine_report(fp32, proto, held)["cosine_mean"]
            rows.append((f"ORT CPU {name}, batch {batch}", r, cos))
    base = {b: dict((n, r) for n, r, _ in rows)[f"ORT CPU fp32, batch {b}"] for b in (1, 32)}
    print(f"| what | img/s | vs ORT fp32 same batch | cosine vs fp32 ({len(held)} held-out images) |")
    print("|---|---|---|---|")
    for name, r, cos in rows:
        b = 1 if name.endswith("batch 1") else 32
        print(f"| {name} | {r:.1f} | {r / base[b]:.2f}x | {'' if cos is None else f'{cos:.5f}'} |")


if __name__ == "__main__":
    main()
