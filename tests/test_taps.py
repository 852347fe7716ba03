"""Several layers from one pass (`export --taps`): each tap equals the single-layer export of the same cut,
extract stores one variable per tap (local and Dask alike), and every reader sees them."""

import json

import numpy as np
import onnxruntime as ort
import pytest
from conftest import SIZE, make_dataset, run_cli

from convcache.export.runner import export_extractor
from convcache.extract.runner import ExtractConfig, run_extract
from convcache.store import FeatureStore

pytestmark = pytest.mark.tf  # exports build Keras models

TAPS = ("block1_pool:avg", "block2_pool:max", "block2_pool", "block3_pool:avg")


@pytest.fixture(scope="module")
def tapped(tmp_path_factory):
    root = tmp_path_factory.mktemp("taps")
    meta = export_extractor("random", SIZE, str(root / "taps.onnx"), taps=TAPS, seed=3)
    singles = {}
    for spec in TAPS:
        layer, _, pooling = spec.partition(":")
        path = root / f"{spec.replace(':', '_')}.onnx"
        export_extractor("random", SIZE, str(path), layer=layer, pooling=pooling or None, seed=3)
        singles[spec] = path
    return root / "taps.onnx", meta, singles


def _run(path, images):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return {o.name: v for o, v in zip(sess.get_outputs(), sess.run(None, {"images": images}))}


def test_each_tap_equals_the_single_layer_export_of_the_same_cut(tapped):
    path, meta, singles = tapped
    assert [t["name"] for t in meta["taps"]] == ["block1_pool_avg", "block2_pool_max", "block2_pool",
                                                 "block3_pool_avg"]
    images = np.random.default_rng(0).uniform(0, 255, (5, SIZE, SIZE, 3)).astype(np.float32)
    got = _run(path, images)
    assert list(got) == [t["name"] for t in meta["taps"]]
    for spec, tap in zip(TAPS, meta["taps"]):
        want = _run(singles[spec], images)["features"]
        assert got[tap["name"]].shape == want.shape == (5, *tap["shape"])
        rel = float(np.max(np.abs(got[tap["name"]] - want)) / np.max(np.abs(want)))
        assert rel <= 1e-5, (spec, rel)


def test_taps_are_refused_with_a_layer_or_another_precision(tmp_path):
    for extra in (["--layer", "block4_pool"], ["--precision", "fp16"]):
        r = run_cli("export", "--weights", "random", "--input-size", SIZE, "--taps", "block1_pool:avg", *extra,
                    "-o", tmp_path / "x.onnx")
        assert r.returncode == 2 and "--taps" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = run_cli("export", "--weights", "random", "--input-size", SIZE, "--taps", "block1_pool:mean", "-o",
                tmp_path / "x.onnx")
    assert r.returncode == 2 and "block1_pool:mean" in r.stderr


@pytest.mark.parametrize("where", ["local", pytest.param("dask", marks=pytest.mark.dask)])
def test_extract_stores_one_variable_per_tap_equal_to_the_single_layer_stores(tapped, tmp_path, where):
    path, meta, singles = tapped
    data = make_dataset(tmp_path / "data", splits={"train": 4, "validation": 2})
    extra = {"cluster": "local:2"} if where == "dask" else {}
    run_extract(ExtractConfig(model=str(path), data=str(data), output=str(tmp_path / "t.zarr"), augment=1,
                              chunk_rows=4, progress=False, **extra))
    fs = FeatureStore(tmp_path / "t.zarr")
    names = [t["name"] for t in meta["taps"]]
    assert fs.variables("train") == names and fs.rows("train") == 16
    for split in fs.splits:
        assert fs.verify(split) == ([], None)
    for spec, name in zip(TAPS, names):  # rows through the base once; each tap as its own export gives it
        run_extract(ExtractConfig(model=str(singles[spec]), data=str(data), output=str(tmp_path / f"{name}.zarr"),
                                  augment=1, chunk_rows=4, progress=False))
        single = FeatureStore(tmp_path / f"{name}.zarr").load("train")
        got = fs.load("train", variable=name)
        assert got.path == single.path and (got.copy == single.copy).all()
        assert np.max(np.abs(got.features - single.features)) <= 1e-5 * np.max(np.abs(single.features))
    assert len(fs.load("train", max_copy=0, variable="block2_pool")) == 8
    assert fs.take("train", [3, 1], variable="block3_pool_avg").shape == (2, 256)


def test_info_shows_the_taps_and_their_sizes(tapped, tmp_path):
    path, meta, _ = tapped
    data = make_dataset(tmp_path / "data", splits={"train": 2})
    run_extract(ExtractConfig(model=str(path), data=str(data), output=str(tmp_path / "t.zarr"), progress=False))
    r = run_cli("info", tmp_path / "t.zarr", "--json")
    variables = json.loads(r.stdout)["splits"]["train"]["variables"]
    assert sorted(variables) == sorted(t["name"] for t in meta["taps"])  # (--json sorts keys)
    assert variables["block2_pool"]["shape"] == [8, 8, 128] and variables["block2_pool"]["bytes"] == 4 * 8 * 8 * 128 * 4
    assert "taps: block1_pool_avg [64]" in run_cli("info", tmp_path / "t.zarr").stdout
    r = run_cli("info", path)
    assert "output: block2_pool float32 [None, 8, 8, 128]" in r.stdout


def test_the_null_device_gives_each_tap_the_shape_its_graph_infers(tapped):
    """Extract's null device takes the outputs' shapes from the contract (no model loaded); they are the ones
    shape inference gives the graph, for every tap, in the runtime's output order."""
    from convcache.extract.engine import ExtractorSession
    from convcache.runtime import NullSession

    path, _, _ = tapped
    s = ExtractorSession(str(path), "null")
    x = np.zeros((2, SIZE, SIZE, 3), np.float32)
    inferred = NullSession(str(path)).run(s.outputs, {"images": x})
    got = s(x)
    assert list(got) == [t.name for t in s.contract.taps]
    assert [v.shape for v in got.values()] == [v.shape for v in inferred] == [v.shape for v in _run(path, x).values()]
