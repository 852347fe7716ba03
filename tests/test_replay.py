"""Method 2 is a replay of the cache: the TensorFlow end-to-end reference (frozen base, on-the-fly
augmentation) and the dense head trained on cached copies with the replay schedule are the same
computation. Same initial weights, batch order and copies -> the same per-epoch losses and predictions."""

import numpy as np
import pytest
from conftest import SIZE, in_worker, make_dataset

from convcache.augment import PRESETS
from convcache.extract.runner import ExtractConfig, run_extract
from convcache.train.reference import ReferenceConfig, run_reference
from convcache.train.runner import train_head

pytestmark = pytest.mark.tf

EPOCHS = 3
COMMON = {"epochs": EPOCHS, "batch_size": 4, "learning_rate": 1e-3, "seed": 1}


@pytest.fixture(scope="module")
def replay_setup(pooled_extractor, tmp_path_factory):
    root = tmp_path_factory.mktemp("replay")
    data = make_dataset(root / "data", splits={"train": 5, "validation": 4}, seed=3)
    store = root / "f.zarr"
    run_extract(ExtractConfig(model=str(pooled_extractor), data=str(data), output=str(store), augment=EPOCHS,
                              seed=1, policy=PRESETS["book"], progress=False))
    return root, data, store


def _reference(root, data, dropout, tag, augment=True):
    return run_reference(ReferenceConfig(data=str(data), weights="random", output=str(root / f"ref-{tag}"),
                                         augment=augment, input_size=SIZE, policy=PRESETS["book"],
                                         layer="block3_pool", pooling="avg", dropout=dropout, progress=False,
                                         **COMMON))


def _replay(root, store, dropout, tag, copies=EPOCHS, schedule="replay"):
    return train_head(str(store), "dense", str(root / f"head-{tag}"), copies=copies,
                      params={**COMMON, "schedule": schedule, "dropout": dropout})


def _assert_same(ref, head):
    ref_loss = np.array([h["train_loss_mean"] for h in ref["history"]])
    head_loss = np.array([h["train_loss_mean"] for h in head["selection"]["history"]])
    assert len(ref_loss) == len(head_loss) == EPOCHS
    np.testing.assert_allclose(head_loss, ref_loss, rtol=1e-4)
    sel_ref = np.array([h["select_loss"] for h in ref["history"]])
    sel_head = np.array([h["select_loss"] for h in head["selection"]["history"]])
    np.testing.assert_allclose(sel_head, sel_ref, rtol=1e-4)
    np.testing.assert_allclose(np.array(head["report_proba"]), np.array(ref["report_proba"]), atol=1e-4)
    assert head["selection"]["copies_used"] == ref["selection"]["copies_used"] == list(range(1, EPOCHS + 1))


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_replay_from_cache_equals_end_to_end_reference(replay_setup, dropout):
    in_worker(_w_replay_from_cache_equals_end_to_end_reference, replay_setup, dropout)


def _w_replay_from_cache_equals_end_to_end_reference(replay_setup, dropout):
    root, data, store = replay_setup
    ref = _reference(root, data, dropout, f"d{dropout}")
    head = _replay(root, store, dropout, f"d{dropout}")
    _assert_same(ref, head)


def test_replay_detects_a_shifted_copy(replay_setup):
    in_worker(_w_replay_detects_a_shifted_copy, replay_setup)


def _w_replay_detects_a_shifted_copy(replay_setup):
    """The test above can fail: a replay that feeds the wrong copies drifts from the reference. The
    losses themselves are compared (not the copies-used bookkeeping, which would differ by construction)."""
    root, data, store = replay_setup
    ref = _reference(root, data, 0.0, "shift")
    # copies=1 makes replay cycle copy 1 every epoch instead of copies 1, 2, 3
    head = _replay(root, store, 0.0, "shift", copies=1)
    ref_loss = np.array([h["train_loss_mean"] for h in ref["history"]])
    head_loss = np.array([h["train_loss_mean"] for h in head["selection"]["history"]])
    rel = np.abs(head_loss - ref_loss) / np.abs(ref_loss)
    assert rel[0] < 1e-4  # epoch 1 sees copy 1 in both: aligned
    assert rel[1:].max() > 1e-3  # from epoch 2 the copies differ, and so do the losses


def test_method_1_is_the_reference_without_augmentation(replay_setup):
    in_worker(_w_method_1_is_the_reference_without_augmentation, replay_setup)


def _w_method_1_is_the_reference_without_augmentation(replay_setup):
    """K=0: the cached dense head on originals is the reference with --no-augment."""
    root, data, store = replay_setup
    ref = _reference(root, data, 0.0, "plain", augment=False)
    for schedule in ("pool", "replay"):
        head = _replay(root, store, 0.0, f"plain-{schedule}", copies=0, schedule=schedule)
        np.testing.assert_allclose([h["train_loss_mean"] for h in head["selection"]["history"]],
                                   [h["train_loss_mean"] for h in ref["history"]], rtol=1e-4)
        np.testing.assert_allclose(np.array(head["report_proba"]), np.array(ref["report_proba"]), atol=1e-4)


def test_reference_without_freezing_trains_the_base_and_says_it_cannot_be_cached(replay_setup, tmp_path):
    from conftest import run_cli

    root, data, _ = replay_setup
    r = run_cli("reference", "--data", data, "--weights", "random", "--input-size", SIZE, "--layer", "block3_pool",
                "--pooling", "avg", "--epochs", 1, "--batch-size", 4, "--unfreeze", "all", "--quiet",
                "-o", tmp_path / "ref")
    assert r.returncode == 0, r.stderr
    assert "cannot be replayed from a feature cache" in r.stdout
    import json

    m = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    assert m["unfreeze"] == "all" and m["cacheable"] is False and m["base_weights_changed"] is True
    r = run_cli("reference", "--data", data, "--layer", "block4_pool", "--fine-tune", "block5", "-o", tmp_path / "x")
    assert r.returncode == 2 and "no block5" in r.stderr  # a cut model has no block5 to fine-tune
