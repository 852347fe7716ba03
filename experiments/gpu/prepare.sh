#!/usr/bin/env bash
# Here, before a GPU loan: fills .gpu/ (git-ignored) for experiments/gpu/measure.py, through the shared recipe
# (../shared/gpu/prepare.sh: onnxruntime-gpu in 60 MiB parts, zarr's wheels, this project's wheel, setup.sh), plus
#   .gpu/m    the fp32 extractor (EXTRACTOR, default runs/ext.onnx)       - its own call: cp .gpu/m/* /tmp/parts/
#   .gpu/data PHOTOS photos per class from DATA/train (default 160: 320 photos, ~14 MB; travels with .gpu/w)
#   .gpu/w    + onnxconverter-common (fp16), the serve section's stack (fastapi, uvicorn, httpx, ...), and
#             .gpu/w/head: a logistic-regression head on the extractor's features of those photos (and 40
#             validation photos a class), which measure.py fuses with the extractor on the GPU box for the serve
#             section (a fused model, 30 MB, would need a call of its own)
# The extractor is exported first if it is not there (hed, 150 px, block4_pool average-pooled: `fit`'s choice).
# The extractor travels with the last part when both fit one call (it did: 15 + 29 MiB), else in .gpu/m.
# Then, one `run` per part (carry [".gpu/pK"]: mkdir -p /tmp/parts && cp .gpu/pK/* /tmp/parts/), the same for m if
# it is there, and the measuring call (carry [".gpu/w", ".gpu/data"], timeout_s 540):
#   . .gpu/w/setup.sh && python3 experiments/gpu/measure.py --model /tmp/parts/ext.onnx \
#       --head .gpu/w/head --data .gpu/data --out $OUT
set -euo pipefail
top=$(git rev-parse --show-toplevel); cd "$top"
EXTRACTOR=${EXTRACTOR:-runs/ext.onnx}
if [ ! -f "$EXTRACTOR" ]; then
  mkdir -p "$(dirname "$EXTRACTOR")"
  .venv/bin/convcache export --weights hed --input-size 150 --layer block4_pool --pooling avg -o "$EXTRACTOR" -q
fi
DATA=${DATA:-../shared/data/cats_and_dogs_small}; PHOTOS=${PHOTOS:-160}
pick=$(mktemp -d)
for cls in "$DATA"/train/*/; do
  name=$(basename "$cls"); mkdir -p "$pick/train/$name"
  mapfile -t files < <(find "$cls" -maxdepth 1 -name '*.jpg' | sort)
  cp -t "$pick/train/$name" "${files[@]:0:$PHOTOS}"
done
MODEL="$EXTRACTOR" DATA="$pick" bash ../shared/gpu/prepare.sh
# the serve section's head (fused on the GPU box): logreg on these photos' features, 40 validation photos a class
heads=$(mktemp -d); mkdir -p "$heads/data"; ln -s "$pick/train" "$heads/data/train"
for cls in "$DATA"/validation/*/; do
  name=$(basename "$cls"); mkdir -p "$heads/data/validation/$name"
  mapfile -t files < <(find "$cls" -maxdepth 1 -name '*.jpg' | sort)
  cp -t "$heads/data/validation/$name" "${files[@]:0:40}"
done
.venv/bin/convcache extract --model "$EXTRACTOR" --data "$heads/data" -o "$heads/f.zarr" --device cpu -q
.venv/bin/convcache train --features "$heads/f.zarr" --head logreg -o .gpu/w/head -q
rm -rf "$heads"
# one call fewer: the extractor with the last part, when the two (and the working tree) fit a call's 64 MiB
last=$(ls -d .gpu/p* | sort -V | tail -1)
if [ -d .gpu/m ] && [ $(( $(du -sm "$last" | cut -f1) + $(du -sm .gpu/m | cut -f1) )) -le 50 ]; then
  mv .gpu/m/* "$last"/ && rmdir .gpu/m && echo "the extractor travels with $last"
fi
plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform any)
python3 -m pip download -q --no-deps "${plat[@]}" -d .gpu/w onnxconverter-common
# the serve section's stack at this checkout's versions: the serving extra's packages and httpx (bench serve's
# client) with everything they require, read from this venv's metadata (fastapi alone needs annotated-doc and
# opentelemetry-api, which the device image lacks); none of them is numpy or torch's, so nothing of the image's
# own stack is shadowed
mapfile -t pins < <(.venv/bin/python - fastapi uvicorn python-multipart prometheus-client fastapi-offline \
                    cachetools httpx <<'PY'
import re, sys
from importlib.metadata import PackageNotFoundError, distribution

from packaging.requirements import Requirement

seen, todo = {}, list(sys.argv[1:])
while todo:
    name = todo.pop()
    key = re.sub(r"[-_.]+", "-", name).lower()
    if key in seen:
        continue
    try:
        dist = distribution(name)
    except PackageNotFoundError:
        continue
    seen[key] = f"{dist.metadata['Name']}=={dist.version}"
    for r in dist.requires or []:
        req = Requirement(r)
        if not req.marker or req.marker.evaluate({"extra": ""}):
            todo.append(req.name)
print("\n".join(sorted(seen.values())))
PY
)
[ ${#pins[@]} -gt 0 ] && python3 -m pip download -q --no-deps "${plat[@]}" -d .gpu/w "${pins[@]}"
rm -rf "$pick"
du -sh .gpu/* | sed 's/^/  /'
