#!/usr/bin/env bash
# The thesis study's cache (issue 9): hed extractors at block5_pool (copies 0..30 of every training photo:
# the book's 30 epochs of method 2) and block4_pool avg-pooled (copies 0..10: its study runs the same protocol
# shortened to 10 epochs for every arm, to fit a 2-core CPU), 150x150, the book's augmentation (Keras 2.0.8
# semantics), validation as copy 0. Resumable: re-run after an interruption and it computes only what is missing.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:-../shared/data/cats_and_dogs_small}
OUT=${OUT:-runs/study}
CC=.venv/bin/convcache
mkdir -p "$OUT"
lscpu | grep -m1 "Model name" > "$OUT/cpu.txt"
for layer in block5 block4; do
  if [ $layer = block5 ]; then args=(); K=30; else args=(--layer block4_pool --pooling avg); K=10; fi
  [ -f "$OUT/$layer.onnx" ] || $CC export --weights hed --input-size 150 "${args[@]}" -o "$OUT/$layer.onnx"
  # `time` goes to the log: the extraction cost is part of every cached arm's compute
  /usr/bin/time -f "$layer extract wall %e s" $CC extract --model "$OUT/$layer.onnx" --data "$DATA" \
      --augment "$K" --policy book --seed 0 --dtype float32 -o "$OUT/$layer.zarr" || [ $? -eq 3 ]
done
