"""The store's layout as the ecosystem reads it (xarray's DataTree, CF class names, coordinates), and stores
written by the first release's layout: read as they are, migrated in place by a writer, killed mid-migration."""

import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import make_dataset

from convcache.extract.runner import ExtractConfig, run_extract
from convcache.store import FeatureStore, layout

V1 = Path(__file__).parent / "data" / "store_v1.tar.gz"  # see tests/data/README.md

# run in a fresh interpreter that never imports convcache: what a user without it sees
XARRAY_READER = r"""
import json, sys
import xarray as xr
tree = xr.open_datatree(sys.argv[1], engine="zarr")
out = {"splits": sorted(k for k in tree.children), "convcache_imported": "convcache" in sys.modules}
for split in out["splits"]:
    ds = tree[split].to_dataset()
    originals = ds.where(ds["copy"] == 0, drop=True)
    out[split] = {"data_vars": sorted(ds.data_vars), "coords": sorted(ds.coords), "rows": ds.sizes["row"],
                  "label_attrs": {k: v for k, v in ds["label"].attrs.items()},
                  "originals": int(originals.sizes["row"]),
                  "original_copies": sorted(set(originals["copy"].values.tolist())),
                  "original_features": originals["features"].values.tolist(),
                  "children": sorted(tree[split].children)}
out["convcache_imported"] = "convcache" in sys.modules
print(json.dumps(out))
"""


def read_with_xarray(store: Path) -> dict:
    r = subprocess.run([sys.executable, "-c", XARRAY_READER, str(store)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def store(pooled_extractor, tmp_path_factory):
    root = tmp_path_factory.mktemp("layout")
    data = make_dataset(root / "data", classes=("cats", "dogs", "sea lions"), splits={"train": 3, "validation": 2})
    out = root / "f.zarr"
    run_extract(ExtractConfig(model=str(pooled_extractor), data=str(data), output=str(out), augment=2,
                              chunk_rows=4, progress=False))
    return out


def test_xarray_opens_the_store_as_a_datatree_without_convcache(store):
    got = read_with_xarray(store)
    assert not got["convcache_imported"]
    assert got["splits"] == ["train", "validation"]
    fs = FeatureStore(store)
    for split in ("train", "validation"):
        s = got[split]
        assert s["data_vars"] == ["features"]  # the bookkeeping is not data
        assert s["coords"] == ["copy", "image", "label", "path", "sha256"]
        assert s["children"] == ["bookkeeping"]
        assert s["rows"] == fs.rows(split)
        # CF names the classes; a blank inside a class name becomes an underscore
        assert s["label_attrs"]["flag_values"] == [0, 1, 2]
        assert s["label_attrs"]["flag_meanings"] == "cats dogs sea_lions"
        originals = fs.load(split, max_copy=0)
        assert s["originals"] == len(originals) == {"train": 9, "validation": 6}[split]
        assert s["original_copies"] == [0]
        np.testing.assert_array_equal(np.array(s["original_features"], np.float32), originals.features)
    assert got["train"]["rows"] == 27  # 9 photos x (original + 2 copies)


def unpack_v1(tmp_path: Path) -> tuple[Path, Path]:
    with tarfile.open(V1) as tar:
        tar.extractall(tmp_path, filter="data")
    return tmp_path / "store.zarr", tmp_path / "extractor.onnx"


def v1_data(tmp_path: Path) -> Path:
    """The photos the v1 fixture was extracted from (tests/data/README.md): the same generator and seed."""
    data = make_dataset(tmp_path / "data", splits={"train": 3, "validation": 2}, seed=7)
    (data / "train" / "cats" / "broken.jpg").write_bytes(b"not an image")
    return data


def test_a_store_from_the_first_release_reads_as_it_is(tmp_path):
    store, _ = unpack_v1(tmp_path)
    before = (store / "zarr.json").read_bytes()
    fs = FeatureStore(store)
    assert fs.format == layout.FORMAT_V1 and fs.splits == ["train", "validation"]
    assert fs.rows("train") == 12 and fs.copies_available("train") == 1 and fs.rows("validation") == 4
    for split in fs.splits:
        assert fs.verify(split) == ([], None)
    assert fs.skipped("train") == {"data/train/cats/broken.jpg": "not an image"}
    assert len(fs.runs("train")) == 1 and fs.runs("train")[0]["rows"] == 12
    assert len(fs.load("train", max_copy=0)) == 6
    assert (store / "zarr.json").read_bytes() == before  # a reader changes nothing
    assert (store / "train" / "block_start").is_dir()


def test_a_writer_migrates_a_first_release_store_in_place(tmp_path):
    store, extractor = unpack_v1(tmp_path)
    old = FeatureStore(store).load("train")
    data = v1_data(tmp_path)
    s = run_extract(ExtractConfig(model=str(extractor), data=str(data), output=str(store), augment=2,
                                  progress=False))
    fs = FeatureStore(store)
    assert fs.format == layout.FORMAT
    for split in fs.splits:
        assert fs.verify(split) == ([], None)
        assert not (store / split / "block_start").exists() and not (store / split / "stat_cache").exists()
        assert (store / split / "bookkeeping" / "block_start").is_dir()
    new = fs.load("train", current=False)  # as stored (a read follows the listing: paths as listed now)
    # the first release's rows are kept as they were (same order, same bytes); copy 2 is added after them
    np.testing.assert_array_equal(new.features[: len(old)], old.features)
    assert new.path[: len(old)] == old.path and fs.copies_available("train") == 2
    assert s.rows_written == len(new) - len(old) == 6
    assert len(fs.runs("train")) == 2  # the first release's run record is kept
    got = read_with_xarray(store)
    assert got["train"]["data_vars"] == ["features"] and got["train"]["label_attrs"]["flag_meanings"] == "cats dogs"
    assert got["train"]["originals"] == 6


def test_a_migration_killed_midway_loses_nothing_and_the_next_writer_finishes_it(tmp_path, monkeypatch):
    store, extractor = unpack_v1(tmp_path)
    clean = tmp_path / "clean"
    shutil.copytree(store, clean)
    data = v1_data(tmp_path)
    import zarr

    original, deleted = zarr.Group.__delitem__, []

    def delitem(self, key):  # killed once the copies are made and the first original is removed
        deleted.append(key)
        if len(deleted) > 1:
            raise KeyboardInterrupt
        original(self, key)

    monkeypatch.setattr(zarr.Group, "__delitem__", delitem)
    with pytest.raises(KeyboardInterrupt):
        run_extract(ExtractConfig(model=str(extractor), data=str(data), output=str(store), progress=False))
    monkeypatch.undo()
    assert deleted[0] == "block_start"
    fs = FeatureStore(store)  # half moved: readers find the complete copy
    assert fs.verify("train") == ([], None) and fs.runs("train") == FeatureStore(clean).runs("train")
    np.testing.assert_array_equal(fs.load("train").features, FeatureStore(clean).load("train").features)
    s = run_extract(ExtractConfig(model=str(extractor), data=str(data), output=str(store), progress=False))
    assert s.rows_written == 0
    fs = FeatureStore(store)
    assert fs.format == layout.FORMAT and fs.verify("train") == ([], None)
    assert sorted(p.name for p in (store / "train").iterdir() if p.is_dir()) == [
        "bookkeeping", "copy", "features", "image", "label", "path", "sha256"]
