"""Which convs to keep in fp32 in an int8 extractor: speed against fp32 (ONNX Runtime, interleaved rounds,
one run) and what each variant costs a logistic-regression probe (paired, cross-validated), side by side.

    .venv/bin/python experiments/bench_int8.py --calibration runs/rt/calib-train \\
        --probe ../shared/data/cats_and_dogs_small/validation

`--calibration`: images the int8 ranges are set on (here 100 training photos per class); `--probe`:
labelled images for the probe (class folders). Writes one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from convcache.backbone import keras_model, weights
from convcache.export import onnx_target, probe, quantize
from convcache.runtime import cpu_model

VARIANTS = {"none": (False, False), "last": (False, True), "first": (True, False), "first-last": (True, True)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--calibration", required=True)
    p.add_argument("--probe", required=True)
    p.add_argument("--weights", default="hed")
    p.add_argument("--size", type=int, default=150)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = p.parse_args()
    fp32 = onnx_target.keras_to_onnx(keras_model.build_extractor(weights.load_vgg16(args.weights, args.size)))
    calib, held = quantize.split_held_out(quantize.load_calibration(args.calibration, args.size))
    models = {"fp32": fp32}
    for v in args.variants:
        first, last = VARIANTS[v]
        models[v] = quantize.to_int8(fp32, calib, exclude_first_conv=first, exclude_last_conv=last)
    from convcache.artifacts.convert import session

    sessions = {k: session(m) for k, m in models.items()}
    x = (np.random.default_rng(0).random((32, args.size, args.size, 3)) * 255).astype(np.float32)
    rates = {k: [] for k in sessions}
    for _ in range(args.rounds):
        for k, s in sessions.items():
            s.run(None, {"images": x})
            n, t = 0, time.perf_counter()
            while time.perf_counter() - t < args.seconds:
                s.run(None, {"images": x})
                n += len(x)
            rates[k].append(n / (time.perf_counter() - t))
    images, labels, classes = probe.labelled_images(args.probe, args.size, 1000)
    f32 = probe.features(fp32, images)
    out = {"cpu": cpu_model(), "batch": 32, "img_per_s_rounds": {k: [round(r, 1) for r in v] for k, v in rates.items()},
           "vs_fp32": {k: round(statistics.median(v) / statistics.median(rates["fp32"]), 2) for k, v in rates.items()},
           "variants": {}}
    for v in args.variants:
        rep = probe.probe_accuracy(f32, probe.features(models[v], images), labels)
        cos = quantize.cosine_report(fp32, models[v], held)
        out["variants"][v] = {**{k: rep[k] for k in ("images", "accuracy_fp32", "accuracy_int8", "difference",
                                                     "difference_se", "mcnemar_p")},
                              "cosine_mean": cos["cosine_mean"], "cosine_min": cos["cosine_min"]}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
