#!/usr/bin/env bash
# The thesis study (issue 9) on the stores of experiments/study/extract.sh. Resumable: every arm and seed is
# saved as it finishes, and a re-run reads finished arms back.
#   block5_pool (the book's setting): every arm, 3 seeds, one real 5-epoch TensorFlow run of method 2;
#     equal-epochs arms up to K=5 (K=10 and 30 cost 11x and 31x method 2's steps on this 2-core CPU).
#   block4_pool avg-pooled: the same protocol shortened to 10 epochs for every arm (method 2 = replay of
#     copies 1..10), K up to 10, 3 seeds, a 1-epoch TensorFlow run (it measures the end-to-end epoch's cost
#     and checks the replay's first epoch).
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:-../shared/data/cats_and_dogs_small}
OUT=${OUT:-runs/study}
CC=.venv/bin/convcache
common=(--data "$DATA" --weights hed --seeds 0 1 2 --policy book)
if [ "${1:-block5}" = block5 ]; then
  $CC compare "${common[@]}" --copies 0 1 2 5 10 30 --epochs 30 --extractor "$OUT/block5.onnx" --store "$OUT/block5.zarr" --real-epochs 5 \
      --equal-epochs-max-k 5 -o "$OUT/block5-report"
else
  $CC compare "${common[@]}" --copies 0 1 2 5 10 --epochs 10 --layer block4_pool --pooling avg --extractor "$OUT/block4.onnx" \
      --store "$OUT/block4.zarr" --real-epochs 1 --equal-epochs-max-k 10 -o "$OUT/block4-report"
fi
