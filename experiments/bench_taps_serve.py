"""What a fused model cut down to its taps saves at serve time: the same tapped extractor fused with a head on
block4_pool_avg (the graph stops after block4) against a head on the block5_pool map (the whole base),
ONNX Runtime on this CPU, interleaved rounds in one run. Head weights do not matter for speed (a probe fit on
random features of the right width).

    .venv/bin/python experiments/bench_taps_serve.py --extractor runs/layers/taps.onnx --rounds 5
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from convcache import artifacts
from convcache.runtime import cpu_model


def fused_for(extractor: Path, taps: tuple, out: Path) -> Path:
    from convcache.train.fuse import fuse
    from convcache.train.heads import LogRegHead

    ext = artifacts.read(extractor, artifacts.KIND_EXTRACTOR)
    width = sum(int(np.prod(t.shape)) for t in ext.outputs if t.name in taps)
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(64, width)).astype(np.float32), np.arange(64) % 2
    head = LogRegHead(Cs=(1.0,)).fit(X, y)
    proto = head.to_onnx(opset=ext.opset)
    artifacts.Head(head="logreg", classes=("a", "b"), n_features=width, feature_shape=(width,),
                   extractor_identity=ext.identity, taps=taps).write(proto)
    (out / "head").mkdir(parents=True, exist_ok=True)
    artifacts.save_model(proto, out / "head" / "head.onnx")
    fuse(str(extractor), str(out / "head"), str(out / "model.onnx"))
    return out / "model.onnx"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--extractor", required=True, help="a tapped extractor (export --taps) with block4_pool_avg "
                                                      "and block5_pool")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch", type=int, default=32)
    a = p.parse_args()
    import onnxruntime as ort

    tmp = Path(tempfile.mkdtemp())
    arms = {"block4_pool_avg": ("block4_pool_avg",), "block5_pool (map)": ("block5_pool",)}
    sessions = {name: ort.InferenceSession(str(fused_for(Path(a.extractor), taps, tmp / name.split()[0])),
                                           providers=["CPUExecutionProvider"]) for name, taps in arms.items()}
    size = artifacts.read(a.extractor, artifacts.KIND_EXTRACTOR).size
    x = np.random.default_rng(1).uniform(0, 255, (a.batch, size, size, 3)).astype(np.float32)
    for s in sessions.values():  # warm-up
        s.run(None, {"images": x})
    rates = {name: [] for name in sessions}
    for _ in range(a.rounds):
        for name, s in sessions.items():
            t = time.perf_counter()
            s.run(None, {"images": x})
            rates[name].append(a.batch / (time.perf_counter() - t))
    b4, b5 = (float(np.median(r)) for r in rates.values())
    print(json.dumps({"img_per_s": {k: round(float(np.median(v)), 2) for k, v in rates.items()},
                      "ratio_block4_over_block5": round(b4 / b5, 2),
                      "per_round_ratios": [round(u / v, 2) for u, v in zip(*rates.values())],
                      "batch": a.batch, "rounds": a.rounds, "cpu": cpu_model()}))


if __name__ == "__main__":
    main()
