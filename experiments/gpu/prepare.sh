#!/usr/bin/env bash
# Here, before a GPU loan: fills .gpu/ (git-ignored) for experiments/gpu/measure.py, through the shared recipe
# (../shared/gpu/prepare.sh: onnxruntime-gpu in 60 MiB parts, zarr's wheels, this project's wheel, setup.sh), plus
#   .gpu/m    the fp32 extractor (EXTRACTOR, default runs/ext.onnx)       - its own call: cp .gpu/m/* /tmp/parts/
#   .gpu/m2   the fused model for the serve section (FUSED, runs/model.onnx) - its own call: cp .gpu/m2/* /tmp/parts/
#   .gpu/data PHOTOS photos per class from DATA/train (default 160: 320 photos, ~14 MB; travels with .gpu/w)
#   .gpu/w    + onnxconverter-common (fp16) and the serve section's stack (fastapi, uvicorn, httpx, ...)
# Then, one `run` per part (carry [".gpu/pK"]: mkdir -p /tmp/parts && cp .gpu/pK/* /tmp/parts/), the same for m
# and m2, and the measuring call (carry [".gpu/w", ".gpu/data"], timeout_s 540):
#   . .gpu/w/setup.sh && python3 experiments/gpu/measure.py --model /tmp/parts/ext.onnx \
#       --fused /tmp/parts/model.onnx --data .gpu/data --out $OUT
set -euo pipefail
top=$(git rev-parse --show-toplevel); cd "$top"
EXTRACTOR=${EXTRACTOR:-runs/ext.onnx}; FUSED=${FUSED:-runs/model.onnx}
DATA=${DATA:-../shared/data/cats_and_dogs_small}; PHOTOS=${PHOTOS:-160}
pick=$(mktemp -d)
for cls in "$DATA"/train/*/; do
  name=$(basename "$cls"); mkdir -p "$pick/train/$name"
  mapfile -t files < <(find "$cls" -maxdepth 1 -name '*.jpg' | sort)
  cp -t "$pick/train/$name" "${files[@]:0:$PHOTOS}"
done
MODEL="$EXTRACTOR" DATA="$pick" bash ../shared/gpu/prepare.sh
mkdir -p .gpu/m2 && cp "$FUSED" .gpu/m2/
plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform any)
python3 -m pip download -q --no-deps "${plat[@]}" -d .gpu/w onnxconverter-common
# the serve section's stack (fastapi, uvicorn, httpx, ...), at this checkout's versions (typing_extensions too:
# pydantic needs a recent one, and a newer one serves the device's PyTorch as well)
serve='^(fastapi|starlette|pydantic|pydantic[-_]core|annotated[-_]types|typing[-_]inspection|typing[-_]extensions|'
serve+='uvicorn|h11|anyio|'
serve+='sniffio|httpx|httpcore|idna|certifi|python[-_]multipart|prometheus[-_]client)=='
mapfile -t pins < <(.venv/bin/python -m pip freeze 2>/dev/null | grep -i -E "$serve" || true)
[ ${#pins[@]} -gt 0 ] && python3 -m pip download -q --no-deps "${plat[@]}" -d .gpu/w "${pins[@]}"
rm -rf "$pick"
du -sh .gpu/* | sed 's/^/  /'
