"""`make demo`: the whole pipeline on a small built-in example, offline, in a few minutes on a CPU.

export (hed weights) -> extract with augmentation -> train both heads -> compare -> fuse -> one
prediction through the HTTP service. The example is generated: two classes of 64x64 pictures,
discs and stripes, drawn with random colours, sizes and positions.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def make_example(root: Path, per_class: dict | None = None, seed: int = 0) -> Path:
    per_class = per_class or {"train": 20, "validation": 10}
    rng = np.random.default_rng(seed)
    for split, n in per_class.items():
        for cls in ("discs", "stripes"):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                _draw(cls, rng).save(folder / f"{cls}.{i}.jpg", quality=90)
    return root


def _draw(cls: str, rng, size: int = 96) -> Image.Image:
    bg, fg = (tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(2))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    if cls == "discs":
        for _ in range(rng.integers(1, 4)):
            r = int(rng.integers(10, 30))
            x, y = (int(v) for v in rng.integers(r, size - r, 2))
            d.ellipse((x - r, y - r, x + r, y + r), fill=fg)
    else:
        step = int(rng.integers(8, 20))
        for x in range(int(rng.integers(0, step)), size, step):
            d.rectangle((x, 0, x + step // 2, size), fill=fg)
        img = img.rotate(float(rng.uniform(-60, 60)), fillcolor=bg)
    noise = rng.normal(0, 6, (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(img) + noise, 0, 255).astype(np.uint8))


def _step(title: str, args: list[str], ok=(0,)) -> None:
    """One step as a user types it: `convcache ARGS` in a process of its own (the demo sits above the command
    line, never imports it)."""
    print(f"\n== {title}: convcache {' '.join(args)}", flush=True)
    code = subprocess.run([sys.executable, "-m", "convcache", *map(str, args)]).returncode
    if code not in ok:
        sys.exit(f"demo: step failed with exit status {code}")


def _predict_over_http(model: Path, image: Path) -> str:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "convcache", "serve", "--model", str(model), "--port", str(port)])
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        r = httpx.post(url + "/v1/predict", files={"image": (image.name, image.read_bytes(), "image/jpeg")})
        return r.text
    finally:
        proc.terminate()
        proc.wait(30)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="demo-out")
    p.add_argument("--weights", default="hed")
    p.add_argument("--input-size", type=int, default=64)
    a = p.parse_args(argv)
    out = Path(a.out)
    data = make_example(out / "data")
    extractor, store = out / "extractor.onnx", out / "features.zarr"
    size = str(a.input_size)
    _step("export", ["export", "--weights", a.weights, "--input-size", size, "--layer", "block4_pool",
                     "--pooling", "avg", "-o", str(extractor)])
    _step("extract", ["extract", "--model", str(extractor), "--data", str(data), "--augment", "3", "--policy", "book",
                      "-o", str(store)])
    for head in ("logreg", "dense"):
        extra = ["--epochs", "30"] if head == "dense" else []
        _step(f"train {head}", ["train", "--features", str(store), "--head", head, *extra,
                                "-o", str(out / "heads" / head)])
    _step("compare", ["compare", "--data", str(data), "--weights", a.weights, "--input-size", size,
                      "--layer", "block4_pool", "--pooling", "avg", "--extractor", str(extractor),
                      "--store", str(store),
                      "--copies", "0", "1", "3", "--seeds", "0", "1", "--epochs", "3", "--real-epochs", "2",
                      "--learning-rate", "1e-3", "-o", str(out / "report")])
    _step("fuse", ["fuse", "--extractor", str(extractor), "--head", str(out / "heads" / "logreg"),
                   "-o", str(out / "model.onnx")])
    image = next((data / "validation" / "stripes").glob("*.jpg"))
    print(f"\n== serve: one prediction over HTTP for {image}")
    print(_predict_over_http(out / "model.onnx", image))
    print(f"""
Artifacts:
  example images   {data}
  extractor        {extractor}
  feature store    {store}
  heads            {out / 'heads'}/{{logreg,dense}}/head.onnx + metrics.json
  comparison       {out / 'report' / 'report.md'} (+ PNG plots)
  fused model      {out / 'model.onnx'}
Serve it yourself: .venv/bin/convcache serve --model {out / 'model.onnx'}""")


if __name__ == "__main__":
    main()
