"""Contracts between stages and conformance with the ecosystem (scikit-learn, xarray, OpenAPI, Prometheus)."""

import json
import socket
import subprocess
import sys

import numpy as np
import onnx
import pytest
import zarr
from conftest import SIZE, export, make_dataset, run_cli
from PIL import Image

from convcache import artifacts
from convcache.artifacts.metadata import graph_sha256
from convcache.errors import ConvcacheError
from convcache.extract.runner import ExtractConfig, run_extract
from convcache.store import FeatureStore
from convcache.store.layout import COLUMNS
from convcache.train.heads import DenseHead, LogRegHead


@pytest.fixture(scope="module")
def small_store(pooled_extractor, tmp_path_factory):
    root = tmp_path_factory.mktemp("contracts")
    data = make_dataset(root / "data", splits={"train": 6, "validation": 4})
    store = root / "f.zarr"
    run_extract(ExtractConfig(model=str(pooled_extractor), data=str(data), output=str(store), augment=1,
                              progress=False, chunk_rows=5))
    return store


@pytest.mark.slow
def test_identity_is_stable_across_exports_and_processes(tmp_path):
    """Two identical exports (one process, then another process) have one identity, whatever names
    the converter generated (every node and tensor renamed here); other weights give another identity."""
    a = export("random", SIZE, str(tmp_path / "a.onnx"), seed=5)
    b = export("random", SIZE, str(tmp_path / "b.onnx"), seed=5)
    renamed = onnx.compose.add_prefix(onnx.load(tmp_path / "b.onnx"), "renamed/")
    names_a = {n.name for n in onnx.load(tmp_path / "a.onnx").graph.node}
    assert not names_a & {n.name for n in renamed.graph.node}
    assert a["graph_sha256"] == b["graph_sha256"] == graph_sha256(onnx.load(tmp_path / "a.onnx"))
    assert graph_sha256(renamed) == a["graph_sha256"]
    r = run_cli("export", "--weights", "random", "--seed", "5", "--input-size", SIZE, "-o", tmp_path / "c.onnx")
    assert r.returncode == 0, r.stderr
    assert artifacts.read(tmp_path / "c.onnx").identity == a["graph_sha256"]
    d = export("random", SIZE, str(tmp_path / "d.onnx"), seed=6)
    assert d["graph_sha256"] != a["graph_sha256"]


def test_artifact_contracts_read_back(pooled_extractor, fused_model, tmp_path):
    ext = artifacts.read(pooled_extractor)
    assert isinstance(ext, artifacts.Extractor) and ext.input_name == "images" and ext.size == SIZE
    assert ext.feature_shape == (256,) and ext.n_features == 256 and ext.opset == 17
    fused = artifacts.read(fused_model)
    assert isinstance(fused, artifacts.Fused) and fused.classes == ("cats", "dogs")
    with pytest.raises(ConvcacheError, match="not a fused convcache model"):
        artifacts.read(pooled_extractor, artifacts.KIND_FUSED)
    # metadata that lies about the input size is refused with what is wrong
    proto = onnx.load(fused_model)
    meta = json.loads(next(p.value for p in proto.metadata_props if p.key == "convcache.input"))
    for p in proto.metadata_props:
        if p.key == "convcache.input":
            p.value = json.dumps({**meta, "size": SIZE + 8})
    onnx.save(proto, tmp_path / "liar.onnx")
    with pytest.raises(ConvcacheError, match="metadata says input"):
        artifacts.read(tmp_path / "liar.onnx")
    for p in proto.metadata_props:
        if p.key == "convcache.classes":
            p.value = "[not json"
    onnx.save(proto, tmp_path / "badjson.onnx")
    with pytest.raises(ConvcacheError, match="not valid JSON"):
        artifacts.read(tmp_path / "badjson.onnx", artifacts.KIND_FUSED)


def test_fused_model_uses_the_extractors_opset(fused_model):
    proto = onnx.load(fused_model)
    assert {o.domain or "ai.onnx": o.version for o in proto.opset_import}.get("ai.onnx") == 17


def test_typed_store(small_store):
    fs = FeatureStore(small_store)
    assert fs.classes == ["cats", "dogs"] and fs.feature_shape("train") == (256,)
    assert fs.copies_available("train") == 1 and fs.copies_available("validation") == 0
    assert fs.extractor_identity("train") == fs.extractor_identity("validation")
    assert fs.augmentation("train")["policy"]["shear_units"] == "degrees"


def test_store_opens_with_xarray_and_shows_only_committed_rows(small_store):
    xr = pytest.importorskip("xarray")
    ds = xr.open_zarr(str(small_store), group="train")
    fs = FeatureStore(small_store)
    assert ds.sizes["row"] == fs.rows("train") == 24
    assert ds["features"].dims == ("row", "feature_0") and ds["label"].dims == ("row",)
    np.testing.assert_array_equal(ds["features"].values, fs.load("train").features)
    # plain zarr readers see array shapes equal to the commit
    root = zarr.open_group(str(small_store), mode="r")
    assert all(root["train"][name].shape[0] == 24 for name in COLUMNS)


def test_a_crash_before_commit_leaves_no_visible_rows(pooled_extractor, tmp_path, monkeypatch):
    """Blocks that were written but never committed are invisible to zarr/xarray readers."""
    from convcache.store import writer

    data = make_dataset(tmp_path / "d", splits={"train": 6})
    commits = {"n": 0}
    real_commit = writer.SplitWriter.commit

    def crash_on_third(self, rows=None, **kwargs):
        commits["n"] += 1
        if commits["n"] == 3:
            raise KeyboardInterrupt  # the process dies between writing a block and committing it
        return real_commit(self, rows, **kwargs)

    monkeypatch.setattr(writer.SplitWriter, "commit", crash_on_third)
    from convcache.extract import engine

    monkeypatch.setattr(engine, "COMMIT_COST_RATIO", 0)  # a commit at every chunk boundary: blocks of 4 rows
    with pytest.raises(KeyboardInterrupt):
        run_extract(ExtractConfig(model=str(pooled_extractor), data=str(data), output=str(tmp_path / "f.zarr"),
                                  augment=2, progress=False, chunk_rows=4, batch_size=4))
    fs = FeatureStore(tmp_path / "f.zarr")
    xr = pytest.importorskip("xarray")
    ds = xr.open_zarr(str(tmp_path / "f.zarr"), group="train")
    assert fs.rows("train") == 8 and ds.sizes["row"] == 8  # two committed blocks of 4, not the third


@pytest.mark.slow
def test_heads_are_scikit_learn_estimators():
    from sklearn.base import clone
    from sklearn.exceptions import NotFittedError
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer

    for head in (LogRegHead(Cs=(0.1, 1.0)), DenseHead(units=8, epochs=2)):
        twin = clone(head)
        assert twin.get_params() == head.get_params() and twin is not head
        with pytest.raises(NotFittedError):
            head.predict_proba(np.zeros((2, 4), np.float32))
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 5)).astype(np.float32)
    y = (X[:, 0] > 0).astype(int)
    scores = cross_val_score(make_pipeline(FunctionTransformer(), LogRegHead(Cs=(0.01, 1.0))), X, y, cv=3)
    assert scores.mean() > 0.8
    head = LogRegHead(Cs=(0.01, 1.0)).fit(X, y)  # no validation split: C by cross-validation on train
    assert head.selected_by_.endswith("cross-validation on train") and head.score(X, y) > 0.8
    dense = DenseHead(units=16, epochs=15, learning_rate=1e-2, batch_size=8).fit(X, y)  # holds out 10% itself
    assert dense.score(X, y) > 0.8 and dense.best_epoch_ >= 1


@pytest.mark.slow
def test_logreg_passes_sklearn_estimator_checks():
    from sklearn.utils.estimator_checks import check_estimator

    from convcache.train.heads import StreamingLogRegHead

    # every check of scikit-learn's own suite, on the heads as users construct them (default arguments);
    # none is skipped (issue 31: the streaming head failed 11, LogRegHead() 1)
    check_estimator(LogRegHead())
    check_estimator(StreamingLogRegHead())


@pytest.mark.long
@pytest.mark.tf
def test_dense_head_passes_sklearn_estimator_checks():
    """DenseHead() as users construct it passes every check of scikit-learn's suite (3 minutes on 2 cores:
    `make test-long`). It validates its input as scikit-learn's estimators do, takes any labels, and refuses
    one class with a ValueError naming it."""
    from sklearn.utils.estimator_checks import check_estimator

    check_estimator(DenseHead())


@pytest.mark.tf
def test_dense_head_validates_and_encodes_as_scikit_learn_does():
    """The checks above that fail fast, in `make test`: any labels, NaN, sparse input, one class, a wrong
    number of features at predict time."""
    import scipy.sparse

    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 3)).astype(np.float32)
    y = np.array(["dog", "cat"] * 20)
    X[y == "dog", 0] += 3
    head = DenseHead(units=8, epochs=3, batch_size=8).fit(X, y)
    assert list(head.classes_) == ["cat", "dog"] and set(head.predict(X)) <= {"cat", "dog"}
    with pytest.raises(ValueError, match="features"):
        head.predict(X[:, :2])
    bad = X.copy()
    bad[0, 0] = np.nan
    for X_bad, y_bad, words in ((bad, y, "NaN"), (scipy.sparse.csr_matrix(X), y, "(?i)sparse"),
                                (X, np.array(["cat"] * 40), "class"), (X, rng.normal(size=40), "Unknown label")):
        with pytest.raises((ValueError, TypeError), match=words):
            DenseHead(epochs=1).fit(X_bad, y_bad)


def test_info_describes_any_onnx_file(tmp_path):
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "plain.onnx")
    r = run_cli("info", tmp_path / "plain.onnx")
    assert r.returncode == 0 and "input: x float32" in r.stdout and "ai.onnx 13" in r.stdout
    assert "no convcache metadata" in r.stdout
    info = json.loads(run_cli("info", "--json", tmp_path / "plain.onnx").stdout)
    assert info["outputs"][0]["name"] == "y" and info["convcache"] == {}


def test_cli_conventions(pooled_extractor, tmp_path):
    # a closed pipe is not a traceback
    p = subprocess.run(f"{sys.executable} -m convcache info --json {pooled_extractor} | head -1", shell=True,
                       capture_output=True, text=True)
    assert p.stdout.strip() == "{" and "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr
    # -v after the stage name; defaults shown in --help; the description is whole
    r = run_cli("info", str(pooled_extractor), "-v")
    assert r.returncode == 0
    h = " ".join(run_cli("extract", "--help").stdout.split())
    assert "(default: by device, 256 on CUDA, 32 on CPU runtimes)" in h and "(default: keras3)" in h
    assert "(default: 0)" in h  # --augment
    top = run_cli("--help").stdout
    assert "serve one fused ONNX model." in " ".join(top.split())
    # validated before TensorFlow starts: an unknown weights name fails fast and names the choices
    r = run_cli("export", "--weights", "nope", "-o", tmp_path / "x.onnx")
    assert r.returncode == 2 and "unknown weights source 'nope'" in r.stderr and "Traceback" not in r.stderr
    # a bad --policy is refused before any store exists
    data = make_dataset(tmp_path / "d", splits={"train": 2})
    r = run_cli("extract", "--model", pooled_extractor, "--data", data, "-o", tmp_path / "p.zarr",
                "--policy", '{"rotation_range": "a lot"}')
    assert r.returncode == 2 and "rotation_range" in r.stderr and not (tmp_path / "p.zarr").exists()
    r = run_cli("extract", "--model", pooled_extractor, "--data", data, "-o", tmp_path / "p.zarr",
                "--policy", '{"fill_mode": "smear"}')
    assert r.returncode == 2 and "fill_mode" in r.stderr and not (tmp_path / "p.zarr").exists()


def test_serve_on_a_busy_port_fails_clearly(fused_model):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        r = run_cli("serve", "--model", fused_model, "--port", port)
    assert r.returncode == 2 and "cannot listen" in r.stderr and "serving" not in r.stderr


def test_predictor_gives_the_same_pixels_for_every_input_kind(fused_model, tmp_path):
    from PIL import ImageOps

    from convcache.serve.predictor import Predictor

    p = Predictor(fused_model)
    rng = np.random.default_rng(1)
    photo = Image.fromarray(rng.integers(0, 255, (90, 70, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    path = tmp_path / "rotated.jpg"
    photo.save(path, exif=exif, quality=90)
    from_path = p.to_pixels(path)
    assert from_path.shape == (SIZE, SIZE, 3)
    np.testing.assert_array_equal(p.to_pixels(path.read_bytes()), from_path)
    np.testing.assert_array_equal(p.to_pixels(Image.open(path)), from_path)  # EXIF and draft, as for a path
    png = tmp_path / "rotated.png"
    photo.save(png, exif=exif)
    oriented = ImageOps.exif_transpose(Image.open(png))
    np.testing.assert_array_equal(p.to_pixels(np.asarray(oriented)), p.to_pixels(png))


def test_help_states_real_defaults_once_and_fuse_is_described():
    import re

    from conftest import run_cli

    for stage in ("export", "extract", "train", "reference", "fuse", "predict", "serve", "compare", "fit", "info"):
        r = run_cli(stage, "--help")
        text = " ".join(r.stdout.split())  # help lines are wrapped
        assert r.returncode == 0 and "(default: None)" not in text, stage
        assert not re.search(r"\(default: [^)]*\) \(default:", text), stage
    fuse = run_cli("fuse", "--help").stdout
    assert "Join an extractor" in fuse and "the fused .onnx to write" in fuse
    r = run_cli("train", "--features", "x.zarr", "--bogus-flag")
    assert r.returncode == 2 and r.stderr.startswith("usage: convcache train")
