#!/usr/bin/env bash
# Study plan 2 (issue 28): the shared photos through the tapped hed extractor (block3/4/5_pool avg and max,
# and the block5_pool map; one pass), copies 0..10 of every photo (train and validation: fit pools them).
# Resumable: re-run after an interruption and it computes only what is missing. Writes to $RUNS
# (default runs/layers); run it from a `git worktree` so refactors cannot change the code under it.
set -euo pipefail
RUNS=${RUNS:-runs/layers}
PY=${PY:-.venv/bin/python}
D=${DATA:-../shared/data/cats_and_dogs_small}
mkdir -p "$RUNS"
[ -f "$RUNS/taps.onnx" ] || nice -n 10 $PY -m convcache export --weights hed --input-size 150 --taps -o "$RUNS/taps.onnx"
nice -n 10 $PY -m convcache extract --model "$RUNS/taps.onnx" --data "$D" -o "$RUNS/taps.zarr" --augment 10 \
  --augment-splits train,validation --policy book -q
$PY -m convcache info "$RUNS/taps.zarr" > "$RUNS/info.txt"
