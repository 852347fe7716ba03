#!/usr/bin/env bash
# Issue 12's cache: hed block4_pool maps (9x9x512, unpooled) of the shared photos, copies 0..10 of every
# training photo, the book's policy, seed 0 (the same copies as the first study's stores), float16.
# Resumable: re-run after an interruption and it computes only what is missing.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:-../shared/data/cats_and_dogs_small}
OUT=${OUT:-runs/ft}
CC=.venv/bin/convcache
mkdir -p "$OUT"
[ -f "$OUT/block4maps.onnx" ] || $CC export --weights hed --input-size 150 --layer block4_pool -o "$OUT/block4maps.onnx"
$CC extract --model "$OUT/block4maps.onnx" --data "$DATA" --augment 10 --policy book --seed 0 --dtype float16 -q \
    -o "$OUT/b4maps.zarr" || [ $? -eq 3 ]
