import json

import numpy as np
import onnxruntime as ort
import pytest
from conftest import SIZE, make_dataset, run_cli

from convcache.errors import ConvcacheError
from convcache.extract.runner import ExtractConfig, run_extract
from convcache.store import FeatureStore
from convcache.train.data import load_training_data
from convcache.train.fuse import fuse
from convcache.train.heads import DenseHead, LogRegHead
from convcache.train.runner import train_head

FAST_DENSE = {"epochs": 60, "learning_rate": 1e-3, "patience": 10, "units": 32}


def extract(model, data, out, **kw):
    run_extract(ExtractConfig(model=str(model), data=str(data), output=str(out), progress=False, **kw))
    return out


@pytest.fixture(scope="module")
def store(pooled_extractor, tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    data = make_dataset(root / "data", splits={"train": 10, "validation": 6, "test": 4})
    return extract(pooled_extractor, data, root / "f.zarr", augment=1)


@pytest.fixture(scope="module")
def store3(pooled_extractor, tmp_path_factory):
    root = tmp_path_factory.mktemp("train3")
    data = make_dataset(root / "data", classes=("ant", "bee", "cow"), splits={"train": 10, "validation": 6})
    return extract(pooled_extractor, data, root / "f.zarr")


def _session_probs(path, X):
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(["probabilities"], {"features": X})[0]


@pytest.mark.slow
@pytest.mark.parametrize("head, params", [("logreg", {}), ("dense", FAST_DENSE)])
def test_heads_learn_a_separable_fixture(store, tmp_path, head, params):
    m = train_head(str(store), head, str(tmp_path / head), copies=1, params=params)
    assert m["report"]["accuracy"] >= 0.9 and m["test"]["accuracy"] >= 0.9
    assert m["rows"] == {"train": 40, "select": 6, "report": 6, "test": 8}
    assert m["report"]["roc_auc"] >= 0.9 and np.array(m["report"]["confusion_matrix"]).sum() == 6
    saved = json.loads((tmp_path / head / "metrics.json").read_text())
    assert saved["provenance"]["extractor"] == FeatureStore(store).attrs("train")["extractor"]["sha256"]
    assert m["onnx_max_abs_diff"] < 1e-4


def test_copies_select_rows(store, tmp_path):
    assert len(load_training_data(str(store), copies=0).train.y) == 20
    assert len(load_training_data(str(store), copies=1).train.y) == 40


@pytest.mark.slow
@pytest.mark.parametrize("head, params", [("logreg", {}), ("dense", FAST_DENSE)])
def test_multiclass_heads_and_onnx_parity(store3, tmp_path, head, params):
    data = load_training_data(str(store3))
    est = (LogRegHead() if head == "logreg" else DenseHead(**params)).fit(data.train.X, data.train.y,
                                                                          data.select.X, data.select.y)
    assert est is not None and list(est.classes_) == [0, 1, 2]
    proba = est.predict_proba(data.validation.X)
    assert proba.shape == (18, 3) and (est.predict(data.validation.X) == data.validation.y).mean() >= 0.8
    m = train_head(str(store3), head, str(tmp_path / head), params=params)
    assert m["classes"] == ["ant", "bee", "cow"] and "roc_auc" not in m["report"]
    onnx_proba = _session_probs(tmp_path / head / "head.onnx", data.report.X)
    assert onnx_proba.shape == (9, 3)
    # The exported head predicts what the trained one did.
    assert (onnx_proba.argmax(1) == data.report.y).mean() == pytest.approx(m["report"]["accuracy"])


def test_logreg_onnx_parity(store):
    data = load_training_data(str(store))
    est = LogRegHead().fit(data.train.X, data.train.y, data.validation.X, data.validation.y)
    import onnx

    proto = est.to_onnx()
    s = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = s.run(["probabilities"], {"features": data.validation.X})[0]
    np.testing.assert_allclose(got, est.predict_proba(data.validation.X), atol=1e-5)
    assert isinstance(proto, onnx.ModelProto) and est.C_ in est.Cs


def test_fused_model_matches_two_step(pooled_extractor, store, tmp_path):
    train_head(str(store), "logreg", str(tmp_path / "h"))
    meta = fuse(str(pooled_extractor), str(tmp_path / "h"), str(tmp_path / "model.onnx"))
    assert meta["classes"] == ["cats", "dogs"] and meta["extractor"]["weights"]["source"] == "random"
    from convcache.export.onnx_target import sample_images

    images = sample_images(5, SIZE, seed=7)
    ext = ort.InferenceSession(str(pooled_extractor), providers=["CPUExecutionProvider"])
    feats = ext.run(["features"], {"images": images})[0]
    two_step = _session_probs(tmp_path / "h" / "head.onnx", feats.reshape(5, -1))
    fused = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    probs, fused_feats = fused.run(["probabilities", "features"], {"images": images})
    np.testing.assert_allclose(probs, two_step, atol=1e-5)
    np.testing.assert_allclose(fused_feats, feats, atol=1e-5)


def test_fuse_refuses_a_head_from_another_extractor(extractor, store, tmp_path):
    train_head(str(store), "logreg", str(tmp_path / "h"))
    with pytest.raises(ConvcacheError, match="trained on features of extractor"):
        fuse(str(extractor), str(tmp_path / "h"), str(tmp_path / "model.onnx"))
    r = run_cli("fuse", "--extractor", extractor, "--head", tmp_path / "h", "-o", tmp_path / "m.onnx")
    assert r.returncode == 2 and "Traceback" not in r.stderr and not (tmp_path / "m.onnx").exists()


def test_missing_validation_split(pooled_extractor, tmp_path):
    data = make_dataset(tmp_path / "d", splits={"train": 5})
    store = extract(pooled_extractor, data, tmp_path / "f.zarr")
    with pytest.raises(ConvcacheError, match="validation"):
        train_head(str(store), "dense", str(tmp_path / "h"))
    m = train_head(str(store), "logreg", str(tmp_path / "h"), params={"Cs": (0.1,)})
    assert "report" not in m and "select" not in m
    m = train_head(str(store), "logreg", str(tmp_path / "h"))  # C by cross-validation on train instead
    assert m["selection"]["selected_by"].endswith("cross-validation on train")


@pytest.mark.slow
def test_empty_split_is_an_error(pooled_extractor, tmp_path):
    data = make_dataset(tmp_path / "d", splits={"train": 4})
    (data / "validation" / "cats").mkdir(parents=True)
    (data / "validation" / "cats" / "bad.jpg").write_bytes(b"")
    store = extract(pooled_extractor, data, tmp_path / "f.zarr")
    r = run_cli("train", "--features", store, "--head", "logreg", "-o", tmp_path / "h")
    assert r.returncode == 2 and "validation split is empty" in r.stderr
    r = run_cli("train", "--features", tmp_path / "nothing.zarr", "-o", tmp_path / "h")
    assert r.returncode == 2 and "not a feature store" in r.stderr


@pytest.mark.slow
def test_compare_end_to_end_tiny(tmp_path):
    """The whole study on a tiny fixture: every arm, seeds, the real TensorFlow check, tests, report."""
    from convcache.pipeline.compare import CompareConfig, run_compare

    data = make_dataset(tmp_path / "d", splits={"train": 4, "validation": 4})
    cfg = CompareConfig(data=str(data), output=str(tmp_path / "report"), weights="random", input_size=SIZE,
                        layer="block3_pool", pooling="avg", copies=[0, 1, 2], seeds=[0, 1], epochs=2,
                        batch_size=4, learning_rate=1e-3, real_epochs=2, progress=False)
    results = run_compare(cfg)
    arms = results["arms"]
    assert {"method 1", "method 2 (replay)", "cached K=2, equal steps", "cached K=2, equal epochs",
            "linear probe K=0", "linear probe K=2"} <= set(arms)
    assert arms["method 1"]["n_seeds"] == 2 and arms["linear probe K=1"]["n_seeds"] == 1
    steps = results["steps_per_epoch"]
    assert arms["cached K=2, equal steps"]["runs"][0]["steps"] == 2 * steps
    assert arms["cached K=2, equal epochs"]["runs"][0]["steps"] == 2 * 3 * steps
    assert arms["method 2 (replay)"]["runs"][0]["copies_used"] == [1, 2]
    assert results["real_reference"]["max_rel_diff"] < 1e-4  # the replay reproduces TensorFlow's losses
    assert "cached K=1, equal steps vs method 2" in results["tests"]
    assert results["extraction"]["train"]["seconds_per_row"] > 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "Equal gradient steps" in report and "Equal epochs" in report and "| method 1 | dense | 0 |" in report
    for png in ("accuracy_vs_k.png", "accuracy_vs_compute.png"):
        assert (tmp_path / "report" / png).read_bytes()[:4] == b"\x89PNG"
    # resumable: a second run reads every arm back instead of training it again
    before = (tmp_path / "report" / "arms" / "method_1" / "seed0" / "metrics.json").stat().st_mtime_ns
    run_compare(cfg)
    assert (tmp_path / "report" / "arms" / "method_1" / "seed0" / "metrics.json").stat().st_mtime_ns == before


@pytest.mark.slow
def test_compare_on_an_int8_extractor(tmp_path):
    """compare --precision int8: every arm trains on int8 features from their own store (never the fp32
    one), the report says what the TensorFlow check then measures, and a reused extractor's metadata
    (not the defaults) sets the base that TensorFlow rebuilds."""
    from convcache.pipeline.compare import CompareConfig, run_compare
    from convcache.store import FeatureStore

    data = make_dataset(tmp_path / "d", splits={"train": 4, "validation": 4})
    common = dict(data=str(data), copies=[0, 1], seeds=[0], epochs=1, batch_size=4, learning_rate=1e-3,
                  real_epochs=1, equal_epochs=False, progress=False)
    cfg = CompareConfig(output=str(tmp_path / "r8"), weights="random", input_size=SIZE, layer="block3_pool",
                        pooling="avg", precision="int8", calibration=str(data / "train"), **common)
    results = run_compare(cfg)
    assert results["config"]["precision"] == "int8" and results["real_reference"]["extractor_precision"] == "int8"
    store = FeatureStore(tmp_path / "r8" / "features-int8.zarr")
    assert store.extractor_metadata()["precision"] == "int8" and not (tmp_path / "r8" / "features.zarr").exists()
    assert "quantisation's effect" in (tmp_path / "r8" / "report.md").read_text()
    # reuse that extractor with other defaults: its metadata wins (layer, pooling, size, precision)
    again = CompareConfig(output=str(tmp_path / "again"), extractor=str(tmp_path / "r8" / "extractor-int8.onnx"),
                          **common)
    results = run_compare(again)
    c = results["config"]
    assert (c["layer"], c["pooling"], c["input_size"], c["precision"], c["weights"]) == \
        ("block3_pool", "avg", SIZE, "int8", "random")


@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize("head", ["logreg", "logreg-stream"])
def test_linear_heads_export_default_domain_ops_only(head, n_classes):
    """No ai.onnx.ml ops (OpenVINO and TensorRT have none): MatMul/Add/Sigmoid/Softmax, same probabilities."""
    from sklearn.datasets import make_classification

    from convcache.artifacts.convert import session
    from convcache.train.heads import HEADS

    X, y = make_classification(n_samples=300, n_features=20, n_informative=8, n_classes=n_classes, random_state=1)
    X = (X * 7 + 3).astype(np.float32)  # far from standardized: the folded scaler matters
    est = HEADS[head]().fit(X[:200], y[:200], X[200:250], y[200:250])
    proto = est.to_onnx(17)
    assert {n.domain for n in proto.graph.node} <= {""} and [o.domain for o in proto.opset_import] == [""]
    got = session(proto).run(None, {"features": X[250:]})[0]
    np.testing.assert_allclose(got, est.predict_proba(X[250:]), atol=1e-5)


def test_fused_model_uses_only_the_default_onnx_domain(fused_model):
    import onnx

    proto = onnx.load(str(fused_model))
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}
    assert {o.domain for o in proto.opset_import} <= {"", "ai.onnx"}


def test_train_prints_both_halves_with_n_and_an_interval_and_warns_when_small(pooled_extractor, tmp_path):
    data = make_dataset(tmp_path / "d", splits={"train": 6, "validation": 4})
    run_extract(ExtractConfig(model=str(pooled_extractor), data=str(data), output=str(tmp_path / "f.zarr"),
                              progress=False))
    r = run_cli("train", "--features", tmp_path / "f.zarr", "--head", "logreg", "-o", tmp_path / "h")
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip().splitlines()[-1]
    assert line.startswith("select half (chose the epoch/C) ") and "; report half " in line
    assert line.count("(n=4, 95% CI ") == 2
    assert "warning: the report half has only 4 images" in r.stderr


def test_a_changed_head_or_fused_model_is_refused(pooled_extractor, fused_model, tmp_path):
    """A head whose weights were negated after it was written, or whose metadata lists more classes than
    it has outputs, does not fuse; a fused model with changed weights does not load (issue 19, item 8)."""
    import onnx
    from onnx import numpy_helper

    from convcache.artifacts.metadata import get_metadata, set_metadata
    from convcache.errors import ConvcacheError
    from convcache.serve import Predictor
    from convcache.train.fuse import fuse

    head_dir = fused_model.parent / "head"
    fuse(str(pooled_extractor), str(head_dir), str(tmp_path / "ok.onnx"))  # the untouched head fuses

    def negated(src, dst):
        proto = onnx.load(str(src))
        init = max(proto.graph.initializer, key=lambda t: numpy_helper.to_array(t).size)
        init.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(init), init.name))
        onnx.save(proto, str(dst))

    negated(head_dir / "head.onnx", tmp_path / "negated.onnx")
    with pytest.raises(ConvcacheError, match="identity .* is not the one recorded"):
        fuse(str(pooled_extractor), str(tmp_path / "negated.onnx"), str(tmp_path / "x.onnx"))
    proto = onnx.load(str(head_dir / "head.onnx"))
    set_metadata(proto, {**get_metadata(proto), "classes": ["cats", "dogs", "birds"]})
    onnx.save(proto, str(tmp_path / "three.onnx"))
    with pytest.raises(ConvcacheError, match="3 classes .* for 2 output probabilities"):
        fuse(str(pooled_extractor), str(tmp_path / "three.onnx"), str(tmp_path / "x.onnx"))
    negated(fused_model, tmp_path / "fused-negated.onnx")
    with pytest.raises(ConvcacheError, match="is not the one recorded"):
        Predictor(tmp_path / "fused-negated.onnx")
    r = run_cli("predict", "--model", tmp_path / "fused-negated.onnx", tmp_path / "negated.onnx")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_too_many_copies_warns_once(pooled_extractor, tmp_path):
    data = make_dataset(tmp_path / "d", splits={"train": 4, "validation": 4})
    run_extract(ExtractConfig(model=str(pooled_extractor), data=str(data), output=str(tmp_path / "f.zarr"),
                              augment=1, progress=False))
    r = run_cli("train", "--features", tmp_path / "f.zarr", "--head", "logreg", "--copies", 9, "-o", tmp_path / "h")
    assert r.returncode == 0, r.stderr
    assert (r.stdout + r.stderr).count("--copies 9") == 1 and "copies 0..1" in r.stderr


def test_logreg_says_which_C_stopped_at_its_iteration_cap(caplog):
    """The probe's lbfgs cap: one warning naming the C values that did not converge and whether the kept
    one did (the study's fit printed sklearn's, which names neither), and `converged_by_C` in the summary."""
    from sklearn.datasets import make_classification

    from convcache.train.heads import LogRegHead

    X, y = make_classification(400, 60, n_informative=30, random_state=0)
    head = LogRegHead(Cs=(1e-3, 100.0), max_iter=3).fit(X[:300], y[:300], X[300:], y[300:])
    assert head.summary()["converged_by_C"] == {"0.001": head.converged_[1e-3], "100.0": False}
    assert any("100 stopped at max_iter=3" in r.getMessage() for r in caplog.records)
    assert LogRegHead(Cs=(1e-3,), max_iter=1000).fit(X, y, X, y).converged_ == {1e-3: True}
