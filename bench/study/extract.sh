#!/usr/bin/env bash
# The thesis study's cache (issue 9): hed extractors at block5_pool and block4_pool (avg-pooled), 150x150,
# copies 0..30 of every training photo with the book's augmentation (Keras 2.0.8 semantics), validation as
# copy 0. Resumable: re-run after an interruption and it computes only what is missing.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:-../shared/data/cats_and_dogs_small}
OUT=${OUT:-runs/study}
K=${K:-30}
CC=.venv/bin/convcache
mkdir -p "$OUT"
lscpu | grep -m1 "Model name" > "$OUT/cpu.txt"
for layer in block5 block4; do
  if [ $layer = block5 ]; then args=(); else args=(--layer block4_pool --pooling avg); fi
  [ -f "$OUT/$layer.onnx" ] || $CC export --weights hed --input-size 150 "${args[@]}" -o "$OUT/$layer.onnx"
  # `time` goes to the log: the extraction cost is part of every cached arm's compute
  /usr/bin/time -f "$layer extract wall %e s" $CC extract --model "$OUT/$layer.onnx" --data "$DATA" \
      --augment "$K" --policy book --seed 0 --dtype float32 -o "$OUT/$layer.zarr" || [ $? -eq 3 ]
done
