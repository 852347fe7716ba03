"""The extractor on every runtime the project offers, against each other in one run: Keras `predict`,
ONNX Runtime fp32 and int8, OpenVINO fp32 and int8, at batch 1 and 32 (interleaved rounds).

    .venv/bin/convcache export --weights hed --precision int8 --calibration CALIB_DIR -o runs/rt/block5-int8.onnx
    .venv/bin/convcache bench runtime --fp32 runs/study/block5.onnx --int8 runs/rt/block5-int8.onnx

`--pipeline-images N` adds the full pipeline (`convcache extract`: list, hash, read, decode, infer, write a
float32 store; originals only) per ONNX runtime and precision on N training photos, each run into a fresh
store, after the inference rounds, with its ratio to the same runtime's bare batch-32 rate.

OpenVINO rows need `pip install 'convcache[openvino]'` (left out, and said so, otherwise).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from convcache.runtime import cpu_model, create_session, openvino_version


def rate(fn, x, seconds: float) -> float:
    fn(x)  # warm-up (graph building, first-shape compilation)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn(x)
        n += len(x)
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="convcache bench runtime", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fp32", required=True)
    p.add_argument("--int8", required=True)
    p.add_argument("--size", type=int, default=150)
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--pipeline-images", type=int, default=0, metavar="N")
    p.add_argument("--data", default="../shared/data/cats_and_dogs_small")
    args = p.parse_args(argv)
    runners = {}
    for precision, path in (("fp32", args.fp32), ("int8", args.int8)):
        s = create_session(path, "cpu")
        runners[f"ONNX Runtime {precision}"] = lambda x, s=s: s.run(["features"], {"images": x})
        if openvino_version():
            o = create_session(path, "openvino")
            runners[f"OpenVINO {precision}"] = lambda x, o=o: o.run(["features"], {"images": x})
    from convcache.backbone import keras_model, weights

    keras_extractor = keras_model.build_extractor(weights.load_vgg16("hed", args.size))
    runners["Keras predict fp32"] = lambda x: keras_extractor.predict(x, batch_size=len(x), verbose=0)
    rng = np.random.default_rng(0)
    results = {name: {1: [], 32: []} for name in runners}
    for _ in range(args.rounds):
        for batch in (1, 32):
            x = (rng.random((batch, args.size, args.size, 3)) * 255).astype(np.float32)
            for name, fn in runners.items():
                results[name][batch].append(rate(fn, x, args.seconds))
    table = {name: {f"batch {b}": round(statistics.median(v), 1) for b, v in r.items()} for name, r in results.items()}
    fastest = {b: max(statistics.median(r[b]) for r in results.values()) for b in (1, 32)}
    for name, r in results.items():
        for b in (1, 32):
            table[name][f"batch {b} vs fastest"] = round(statistics.median(r[b]) / fastest[b], 2)
    if args.pipeline_images:
        pipeline(args, table, runners)
    print(json.dumps({"cpu": cpu_model(), "openvino": openvino_version(), "img_per_s": table,
                      "note": "batch 1 latency = 1000 / img_per_s ms"}, indent=1))


def pipeline(args, table: dict, runners: dict) -> None:
    import tempfile
    from pathlib import Path

    from convcache.benchmarks.extract import subset
    from convcache.extract.runner import ExtractConfig, run_extract

    tmp = Path(tempfile.mkdtemp())
    data = subset(args.data, args.pipeline_images, tmp / "data")
    for i, name in enumerate(n for n in runners if not n.startswith("Keras")):
        device = "openvino" if name.startswith("OpenVINO") else "cpu"
        model = args.int8 if name.endswith("int8") else args.fp32
        s = run_extract(ExtractConfig(model=model, data=str(data), output=str(tmp / f"{i}.zarr"),
                                      device=device, batch_size=32, progress=False))
        table[name]["pipeline"] = round(s.rows_per_second, 1)
        table[name]["pipeline vs batch 32"] = round(s.rows_per_second / table[name]["batch 32"], 2)


if __name__ == "__main__":
    main()
