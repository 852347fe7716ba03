"""Issue 18: what the study at convergence relies on, and `convcache fit`.

- the dense head's optional standardisation (fit on the training originals, folded into the ONNX head);
- the history's training loss is the epoch mean (as Keras' fit reports it), not the last batch's;
- method 2 replayed from the cache equals the end-to-end reference with standardised features too;
- the seed-then-photo bootstrap and its equivalence test;
- `convcache fit`: photos -> model.onnx with a held-out accuracy and interval, resumable.
"""

import json

import numpy as np
import pytest
from conftest import SIZE, make_dataset, run_cli

from convcache.artifacts.convert import session
from convcache.stats import accuracy_interval, seed_photo_bootstrap
from convcache.train.heads import DenseHead


def _blobs(n=120, d=24, seed=0, scale=300.0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    X = (rng.normal(0, 1, (n, d)) + 1.5 * y[:, None] * (np.arange(d) < 4)) * scale + 50  # large, shifted, like caffe
    return X.astype(np.float32), y


@pytest.mark.slow
def test_standardization_is_fit_on_originals_and_folded_into_the_onnx_head():
    X, y = _blobs()
    copy = np.tile([0, 1, 2], len(y) // 3)
    image = np.arange(len(y))
    X[copy > 0] += 1000.0  # augmented copies shifted: the scaler must ignore them
    Xv, yv = _blobs(40, seed=1)
    head = DenseHead(units=8, epochs=3, learning_rate=1e-3, standardize=True, seed=2).fit(X, y, Xv, yv,
                                                                                         image=image, copy=copy)
    np.testing.assert_allclose(head.scaler_mean_, X[copy == 0].mean(0), rtol=1e-4)
    np.testing.assert_allclose(head.scaler_scale_, X[copy == 0].std(0), rtol=1e-3)
    got = session(head.to_onnx()).run(None, {"features": Xv})[0]
    np.testing.assert_allclose(got, head.predict_proba(Xv), atol=1e-5)  # the ONNX head takes raw features
    raw = DenseHead(units=8, epochs=3, learning_rate=1e-3, seed=2).fit(X, y, Xv, yv, image=image, copy=copy)
    assert not np.allclose(raw.predict_proba(Xv), head.predict_proba(Xv), atol=1e-3)  # it changed training
    assert head.summary()["standardize"] is True and np.isfinite(head.summary()["best_select_loss"])


@pytest.mark.slow
def test_training_loss_in_the_history_is_the_epoch_mean():
    """With a learning rate too small to move the weights and no dropout, every batch's loss is that of the
    initial model, so the epoch mean is the loss over all training rows (the last batch's is not)."""
    X, y = _blobs(102, scale=1.0)  # 102 rows, batch 20: a last batch of 2
    head = DenseHead(units=8, epochs=1, batch_size=20, learning_rate=1e-30, dropout=0.0, seed=0)
    head.fit(X, y, X[:20], y[:20])
    p = head.predict_proba(X)[:, 1].astype(np.float64)
    full = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    h = head.history_[0]
    assert h["train_loss_mean"] == pytest.approx(full, rel=1e-4)
    last = -np.mean([np.log(p[i]) if y[i] else np.log(1 - p[i]) for i in range(100, 102)])
    assert abs(last - full) > 1e-3  # would not pass with the last batch's value
    assert h["train_accuracy_mean"] * 102 == pytest.approx(round(h["train_accuracy_mean"] * 102), abs=1e-3)


@pytest.mark.slow
def test_replay_with_standardized_features_equals_the_end_to_end_reference(pooled_extractor, tmp_path):
    from convcache.augment import PRESETS
    from convcache.extract.runner import ExtractConfig, run_extract
    from convcache.train.reference import ReferenceConfig, run_reference
    from convcache.train.runner import train_head

    data = make_dataset(tmp_path / "data", splits={"train": 5, "validation": 4}, seed=3)
    store = tmp_path / "f.zarr"
    run_extract(ExtractConfig(model=str(pooled_extractor), data=str(data), output=str(store), augment=2, seed=1,
                              policy=PRESETS["book"], progress=False))
    common = {"epochs": 2, "batch_size": 4, "learning_rate": 1e-3, "seed": 1, "dropout": 0.0}
    ref = run_reference(ReferenceConfig(data=str(data), weights="random", output=str(tmp_path / "ref"),
                                        input_size=SIZE, policy=PRESETS["book"], layer="block3_pool", pooling="avg",
                                        progress=False, augment_seed=1, standardize=True, **common))
    head = train_head(str(store), "dense", str(tmp_path / "head"), copies=2,
                      params={**common, "schedule": "replay", "standardize": True})
    for key in ("train_loss_mean", "select_loss"):
        np.testing.assert_allclose([h[key] for h in head["selection"]["history"]], [h[key] for h in ref["history"]],
                                   rtol=1e-4)
    np.testing.assert_allclose(np.array(head["report_proba"]), np.array(ref["report_proba"]), atol=1e-4)
    raw = train_head(str(store), "dense", str(tmp_path / "raw"), copies=2, params={**common, "schedule": "replay"})
    assert np.abs(np.array(raw["report_proba"]) - np.array(ref["report_proba"])).max() > 1e-3  # can fail


def test_seed_photo_bootstrap_and_equivalence():
    rng = np.random.default_rng(0)
    a = (rng.random((5, 500)) < 0.80).astype(int)
    same = a.copy()
    same[:, :3] = 1 - same[:, :3]  # differs on 3 photos of 500
    r = seed_photo_bootstrap(a, same, n_boot=2000, margin=0.015)
    assert r["equivalent"] and r["noninferior"] and abs(r["diff"]) < 0.01
    better = np.maximum(a, (rng.random(a.shape) < 0.5).astype(int))  # half the errors fixed: +10 points
    r = seed_photo_bootstrap(a, better, n_boot=2000, margin=0.015)
    assert not r["equivalent"] and r["noninferior"] and r["ci95"][0] > 0.05
    worse = seed_photo_bootstrap(better, a, n_boot=2000, margin=0.015)
    assert not worse["equivalent"] and not worse["noninferior"]
    lo, hi = accuracy_interval(80, 100)
    assert 0.70 < lo < 0.72 and 0.86 < hi < 0.88  # Wilson's interval of 80/100


@pytest.mark.slow
def test_fit_end_to_end_resumes_and_reports_held_out_accuracy(tmp_path):
    from convcache.artifacts import read

    data = make_dataset(tmp_path / "data", classes=("a", "b", "c"), splits={"train": 8, "validation": 4, "test": 3})
    out = tmp_path / "out"
    args = ["fit", "--data", data, "-o", out, "--weights", "random", "--input-size", SIZE, "--taps",
            "block1_pool:avg,block2_pool:max,block3_pool:avg", "--budget-rows", 200, "-q"]
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("held-out accuracy ") and "(n=36, 95% CI " in last  # every pooled photo, not a half
    assert "test/ photos:" in r.stdout and "(n=9," in r.stdout
    state = json.loads((out / "fit.json").read_text())
    res = state["result"]
    assert res["rows_through_base"] <= 200 + 9 and res["copies_extracted"] in (0, 2, 4)
    fused = read(out / "model.onnx")
    assert fused.kind == "fused" and fused.extractor["taps"] == res["choice"]["taps"]
    assert fused.head_provenance["fit"]["held_out"]["n"] == 36  # the model records the choice and the estimate
    for name in ("report.md", "report.json", "report.png"):
        assert (out / name).is_file()
    assert "Held-out accuracy" in (out / "report.md").read_text()
    stamp = (out / "model.onnx").stat().st_mtime_ns
    r2 = run_cli(*args)  # nothing changed: the model is current, nothing is fitted again
    assert r2.returncode == 0 and r2.stdout.strip().splitlines()[-1] == last
    assert (out / "model.onnx").stat().st_mtime_ns == stamp
    # photos moved between classes: fit again, on the new labels, recorded in the model (issue 30)
    for i in range(3):
        (data / "train" / "a" / f"a.{i}.jpg").rename(data / "train" / "b" / f"moved.{i}.jpg")
    r3 = run_cli(*args)
    assert r3.returncode == 0, r3.stderr
    new = json.loads((out / "fit.json").read_text())["result"]["listing"]
    assert new["train"] != res["listing"]["train"] and new["validation"] == res["listing"]["validation"]
    assert read(out / "model.onnx").head_provenance["fit"]["listing"] == new
    r = run_cli(*args[:-1], "--preprocess", "rescale", "-q")  # other export settings in the same folder
    assert r.returncode == 2 and "other export settings" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("fit", "--data", tmp_path / "nowhere", "-o", tmp_path / "o2", "-q")
    assert r.returncode == 2 and "folder of photos" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_train_learning_rate_auto_searches_on_the_select_half(pooled_extractor, tmp_path):
    from convcache.extract.runner import ExtractConfig, run_extract

    data = make_dataset(tmp_path / "data", splits={"train": 6, "validation": 4})
    run_extract(ExtractConfig(model=str(pooled_extractor), data=str(data), output=str(tmp_path / "f.zarr"),
                              progress=False))
    r = run_cli("train", "--features", tmp_path / "f.zarr", "--head", "dense", "--learning-rate", "auto", "--epochs",
                2, "--standardize", "-q", "-o", tmp_path / "h")
    assert r.returncode == 0, r.stderr
    sel = json.loads((tmp_path / "h" / "metrics.json").read_text())["selection"]
    tried = sel["learning_rate_search"]
    assert {"2e-05", "0.0002"} <= set(tried) and len(tried) >= 4  # two starts, a walk, two refinements
    best = tried[f"{sel['learning_rate']:.2g}"]["select_loss"]
    assert best == min(t["select_loss"] for t in tried.values())  # the kept head has the lowest select-half loss
    r = run_cli("train", "--features", tmp_path / "f.zarr", "--head", "logreg", "--learning-rate", "auto", "-o",
                tmp_path / "h2")
    assert r.returncode == 2 and "Traceback" not in r.stderr
