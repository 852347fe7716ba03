"""`convcache bench runtime|extract|serve|scale ARGS...`: see `convcache bench <name> --help`."""

from __future__ import annotations

import argparse
import importlib

BENCHES = {"runtime": "the extractor on every runtime (Keras, ONNX Runtime, OpenVINO; fp32, int8)",
           "extract": "the whole extract pipeline against bare inference on the same images",
           "serve": "the HTTP service under load against the bare Predictor; cache hits; a soak with bad input",
           "scale": "every stage but the model at N = 10k..1M generated photos: seconds, rows/s, peak RSS, metadata"}


def register(sub) -> None:
    b = sub.add_parser("bench", help="benchmarks: " + "; ".join(f"{k}: {v}" for k, v in BENCHES.items()),
                       description="Each prints Markdown rows with the CPU model; `convcache bench NAME --help`.")
    b.add_argument("name", choices=sorted(BENCHES))
    b.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own options")
    b.set_defaults(func=run_bench)


def run_bench(args) -> int:
    module = importlib.import_module(f"convcache.benchmarks.{args.name}")
    module.main(args.args)
    return 0
