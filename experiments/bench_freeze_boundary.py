"""A fine-tuning epoch end to end in TensorFlow (blocks 1-4 frozen, block5 + head trained, augmenting on
the fly, as `reference --fine-tune block5` runs it) against a fine-tuning epoch on cached block4_pool
maps (block5 + head only, as `train --train-top block5` runs it), and an epoch with nothing frozen
(`reference --unfreeze all`), measured in one run, interleaved, on the same photos and copies.

    .venv/bin/python experiments/bench_freeze_boundary.py --extractor runs/ft/block4maps.onnx --store runs/ft/b4maps.zarr

Per-step times are measured over `--steps` train_on_batch calls per round (batch 20, the book's) and
extrapolated to an epoch of the shared training set (2,000 images = 100 steps). The cached epoch also
pays for reading its 2,000 rows from the store (measured with FeatureStore.take on --store).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from convcache.runtime import cpu_model


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--extractor", required=True, help="a block4_pool (unpooled) extractor from convcache export")
    p.add_argument("--store", help="a store of its maps: times reading one epoch's rows from it")
    p.add_argument("--data", default="../shared/data/cats_and_dogs_small")
    p.add_argument("--images", type=int, default=120)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=20)
    p.add_argument("--epoch-images", type=int, default=2000)
    args = p.parse_args()

    from convcache.augment import AugmentPolicy, augment
    from convcache.backbone import weights
    from convcache.imaging import read_and_decode
    from convcache.runtime import create_session
    from convcache.tfquiet import import_keras
    from convcache.train.heads import dense_head_layers
    from convcache.train.loop import compile_head_model
    from convcache.train.reference import build_model
    from convcache.train.top import build_top

    _, keras = import_keras()
    files = sorted((Path(args.data) / "train" / "cats").glob("*.jpg"))[: args.images // 2] + \
        sorted((Path(args.data) / "train" / "dogs").glob("*.jpg"))[: args.images // 2]
    decoded = [read_and_decode(str(f), 150) for f in files]
    shas = [__import__("hashlib").sha256(raw).hexdigest() for raw, _ in decoded]
    pixels = np.stack([px for _, px in decoded])
    labels = np.array([0] * (args.images // 2) + [1] * (args.images // 2))
    policy = AugmentPolicy.parse("book")
    session = create_session(args.extractor, "cpu")
    maps = np.concatenate([session.run(None, {"images": np.stack([augment(pixels[i], policy, 0, shas[i], 1)
                                                                     for i in range(b, min(b + 20, len(pixels)))])
                                                  .astype(np.float32)})[0] for b in range(0, len(pixels), 20)])

    # end to end, blocks 1-4 frozen, block5 trainable (what reference --fine-tune block5 trains)
    base = weights.load_vgg16("hed", 150)
    e2e, _ = build_model(keras, base, 2)
    base.trainable = True
    for layer in base.layers:
        layer.trainable = layer.name.startswith("block5")
    compile_head_model(keras, e2e, 2, 1e-5)
    # nothing frozen (reference --unfreeze all)
    base_all = weights.load_vgg16("hed", 150)
    everything, _ = build_model(keras, base_all, 2)
    base_all.trainable = True
    compile_head_model(keras, everything, 2, 1e-5)
    # cached: block5 + head on block4_pool maps (train --train-top block5)
    top = build_top(keras, "block5", maps.shape[1:], "hed", 150)
    inputs = keras.Input(maps.shape[1:], name="features")
    cached = keras.Model(inputs, dense_head_layers(keras, 2)(keras.layers.Flatten()(top(inputs))))
    top.trainable = True
    compile_head_model(keras, cached, 2, 1e-5)

    rng = np.random.default_rng(0)
    bs = args.batch_size

    def batch_idx():
        return rng.choice(len(labels), bs, replace=False)

    def step_e2e(model):
        idx = batch_idx()
        t = time.perf_counter()
        x = np.stack([augment(pixels[i], policy, 0, shas[i], 1) for i in idx]).astype(np.float32)
        t_aug = time.perf_counter() - t
        model.train_on_batch(x, labels[idx])
        return time.perf_counter() - t, t_aug

    def step_cached():
        idx = batch_idx()
        t = time.perf_counter()
        cached.train_on_batch(maps[idx], labels[idx])
        return time.perf_counter() - t, 0.0

    runs = {"end to end, block5 + head trained": lambda: step_e2e(e2e),
            "cached block4 maps, block5 + head trained": step_cached,
            "end to end, nothing frozen": lambda: step_e2e(everything)}
    for fn in runs.values():  # warm-up: graph building
        fn()
        fn()
    times = {k: [] for k in runs}
    augment_s = {k: [] for k in runs}
    for _ in range(args.rounds):
        for name, fn in runs.items():
            for _ in range(args.steps):
                total, aug = fn()
                times[name].append(total)
                augment_s[name].append(aug)
    steps_per_epoch = -(-args.epoch_images // bs)
    read_s = None
    if args.store:
        from convcache.store import FeatureStore

        fs = FeatureStore(args.store)
        d = fs.load("train", with_features=False, verify=False)
        rows = d.row[d.copy == 1][: args.epoch_images]
        t = time.perf_counter()
        got = fs.take("train", rows)
        read_s = time.perf_counter() - t
        row_bytes = int(np.prod(got.shape[1:])) * got.dtype.itemsize
        del got
    out = {"cpu": cpu_model(), "batch_size": bs, "steps_measured": args.steps * args.rounds,
           "epoch_images": args.epoch_images}
    for name in runs:
        step = statistics.median(times[name])
        out[name] = {"ms_per_step": round(1000 * step, 1),
                     "augment_ms_per_step": round(1000 * statistics.median(augment_s[name]), 1),
                     "epoch_s": round(step * steps_per_epoch + (read_s or 0) * ("cached" in name), 1)}
    e2e_epoch = out["end to end, block5 + head trained"]["epoch_s"]
    cached_epoch = out["cached block4 maps, block5 + head trained"]["epoch_s"]
    out["ratio_e2e_over_cached_epoch"] = round(e2e_epoch / cached_epoch, 2)
    out["ratio_unfrozen_over_cached_epoch"] = round(out["end to end, nothing frozen"]["epoch_s"] / cached_epoch, 2)
    if read_s is not None:
        out["cached_epoch_store_read_s"] = round(read_s, 2)
        out["store_bytes_per_row_in_memory"] = row_bytes
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
