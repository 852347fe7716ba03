"""Cache at the freeze boundary: fine-tuning block5 end to end (blocks 1-4 frozen, on-the-fly
augmentation) and fine-tuning block5 on cached block4_pool maps are the same computation. Same initial
weights, batch order, copies and dropout masks -> the same per-epoch losses and predictions; and the
trained top fuses with the block4 extractor into one model that serves without TensorFlow."""

import hashlib

import numpy as np
import pytest
from conftest import SIZE, export, in_worker, make_dataset, run_cli

from convcache.augment import PRESETS
from convcache.extract.runner import ExtractConfig, run_extract
from convcache.train.reference import ReferenceConfig, run_reference
from convcache.train.runner import train_head

pytestmark = pytest.mark.tf

FROZEN, FINE = 2, 2
COMMON = {"batch_size": 4, "learning_rate": 1e-3, "seed": 1}


@pytest.fixture(scope="module")
def boundary(tmp_path_factory):
    root = tmp_path_factory.mktemp("boundary")
    data = make_dataset(root / "data", splits={"train": 5, "validation": 4}, seed=3)
    model = root / "block4.onnx"
    export("random", SIZE, str(model), layer="block4_pool", seed=COMMON["seed"])
    store = root / "maps.zarr"
    run_extract(ExtractConfig(model=str(model), data=str(data), output=str(store), augment=FROZEN + FINE, seed=1,
                              policy=PRESETS["book"], progress=False))
    return root, data, store, model


_REFERENCES: dict = {}


def _reference(root, data, dropout, tag):
    """The end-to-end run for `dropout`, once per module (the tests compare several cached runs to it)."""
    if dropout not in _REFERENCES:
        _REFERENCES[dropout] = run_reference(ReferenceConfig(
            data=str(data), weights="random", output=str(root / f"ref-{tag}"), epochs=FROZEN, fine_tune="block5",
            fine_tune_epochs=FINE, input_size=SIZE, policy=PRESETS["book"], dropout=dropout, progress=False,
            **COMMON))
    return _REFERENCES[dropout]


def _top(root, store, dropout, tag, copies=None):
    return train_head(str(store), "dense", str(root / f"top-{tag}"), copies=copies, train_top="block5",
                      params={**COMMON, "epochs": FROZEN, "fine_tune_epochs": FINE, "schedule": "replay",
                              "dropout": dropout})


def _assert_same(ref, top):
    hist_ref, hist_top = ref["history"], top["selection"]["history"]
    assert len(hist_ref) == len(hist_top) == FROZEN + FINE
    assert [h["phase"] for h in hist_top] == ["frozen"] * FROZEN + ["fine-tune block5"] * FINE
    for key in ("train_loss_mean", "select_loss"):
        np.testing.assert_allclose([h[key] for h in hist_top], [h[key] for h in hist_ref], rtol=1e-4)
    np.testing.assert_allclose(np.array(top["report_proba"]), np.array(ref["report_proba"]), atol=1e-4)
    assert top["selection"]["copies_used"] == ref["selection"]["copies_used"] == list(range(1, FROZEN + FINE + 1))


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_fine_tuning_block5_on_cached_maps_equals_end_to_end(boundary, dropout):
    in_worker(_w_fine_tuning_block5_on_cached_maps_equals_end_to_end, boundary, dropout)


def _w_fine_tuning_block5_on_cached_maps_equals_end_to_end(boundary, dropout):
    root, data, store, _ = boundary
    ref = _reference(root, data, dropout, f"d{dropout}")
    top = _top(root, store, dropout, f"d{dropout}")
    _assert_same(ref, top)
    assert top["selection"]["top_weights_changed"]  # block5 trained (whichever phase was kept)
    assert top["head"] == "top-block5" and top["selection"]["cached_boundary"] == "block4_pool"


def test_the_equivalence_can_fail(boundary):
    in_worker(_w_the_equivalence_can_fail, boundary)


def _w_the_equivalence_can_fail(boundary):
    """Feeding copy 1 every epoch instead of copies 1..4 drifts from the end-to-end run: the losses
    themselves differ from epoch 2 on (epoch 1 sees copy 1 in both)."""
    root, data, store, _ = boundary
    ref = _reference(root, data, 0.0, "shift")
    top = _top(root, store, 0.0, "shift", copies=1)
    ref_loss = np.array([h["train_loss_mean"] for h in ref["history"]])
    top_loss = np.array([h["train_loss_mean"] for h in top["selection"]["history"]])
    rel = np.abs(top_loss - ref_loss) / np.abs(ref_loss)
    assert rel[0] < 1e-4
    assert rel[1:].max() > 1e-3


def test_trained_top_fuses_with_the_block4_extractor_and_serves_without_tensorflow(boundary):
    in_worker(_w_trained_top_fuses_with_the_block4_extractor_and_serves_without_tensorflow, boundary)


def _w_trained_top_fuses_with_the_block4_extractor_and_serves_without_tensorflow(boundary):
    """extractor-to-block4 + trained block5 + head as one ONNX model: pixels in, the reference's
    probabilities out."""
    from convcache.imaging import read_and_decode
    from convcache.serve import Predictor
    from convcache.train.fuse import fuse

    root, data, store, model = boundary
    ref = _reference(root, data, 0.0, "fuse")
    _top(root, store, 0.0, "fuse")
    meta = fuse(str(model), str(root / "top-fuse"), str(root / "fused.onnx"))
    assert meta["head"] == "top-block5"
    pixels = {}
    for path in sorted((data / "validation").rglob("*.jpg")):
        raw, px = read_and_decode(str(path), SIZE)
        pixels[hashlib.sha256(raw).hexdigest()] = px
    x = np.stack([pixels[s] for s in ref["report_sha256"]])
    predictor = Predictor(str(root / "fused.onnx"))
    got = np.array([[r.probabilities[c] for c in meta["classes"]] for r in predictor.predict(list(x))])
    np.testing.assert_allclose(got, np.array(ref["report_proba"]), atol=1e-4)


def test_train_top_refuses_a_store_without_the_boundary_maps(pooled_extractor, tmp_path):
    data = make_dataset(tmp_path / "data", splits={"train": 3, "validation": 2})
    run_extract(ExtractConfig(model=str(pooled_extractor), data=str(data), output=str(tmp_path / "p.zarr"),
                              progress=False))
    r = run_cli("train", "--features", tmp_path / "p.zarr", "--head", "dense", "--train-top", "block5", "-o",
                tmp_path / "h")
    assert r.returncode == 2 and "block4_pool maps" in r.stderr and "Traceback" not in r.stderr


def test_reading_the_epoch_in_segments_changes_nothing(boundary):
    """The pool schedule reads an epoch in bounded segments; the steps are the same as reading it at once."""
    in_worker(_w_reading_the_epoch_in_segments_changes_nothing, boundary)


def _w_reading_the_epoch_in_segments_changes_nothing(boundary):
    from convcache.train import top

    root, _, store, _ = boundary
    params = {**COMMON, "epochs": 1, "fine_tune_epochs": 1, "schedule": "pool", "dropout": 0.0}
    whole = train_head(str(store), "dense", str(root / "seg-whole"), train_top="block5", params=params)
    saved, top.SEGMENT_ROWS = top.SEGMENT_ROWS, 5  # batches of 4: segments of 8 rows, several per epoch
    try:
        parts = train_head(str(store), "dense", str(root / "seg-parts"), train_top="block5", params=params)
    finally:
        top.SEGMENT_ROWS = saved
    np.testing.assert_allclose([h["train_loss_mean"] for h in parts["selection"]["history"]],
                               [h["train_loss_mean"] for h in whole["selection"]["history"]], rtol=1e-6)
    assert parts["steps"] == whole["steps"] == 2 * -(-50 // 4)  # 10 images x 5 copies (0..4) per epoch
