"""Issue 22's contracts at test size: what a commit writes does not grow with the store, the stat cache
(re-hash exactly what changed), skipped files and run records out of the attributes (old stores still
read), and reads that touch only the chunks holding the rows asked for."""

from __future__ import annotations

import os
import re
import shutil

import numpy as np
import pytest
from conftest import make_dataset, run_cli
from PIL import Image

from convcache.extract.runner import ExtractConfig, run_extract
from convcache.store import FeatureStore, statcache

PAST = 1_600_000_000


def _age(root):
    """Every file's mtime moved into the past: the stat cache trusts keys only of files not modified lately."""
    for dirpath, _, files in os.walk(root):
        for f in files:
            os.utime(os.path.join(dirpath, f), (PAST, PAST))


def _extract(extractor, data, store, **kw):
    return run_extract(ExtractConfig(model=str(extractor), data=str(data), output=str(store), progress=False,
                                     chunk_rows=4, **kw))


def _counts_as_zero(text: bytes) -> bytes:
    """Metadata with every hash and every number written as one symbol: two stores' commits then differ only if
    one writes more entries, not because a count (a shape, a row total) has more digits."""
    return re.sub(rb"\d+", b"0", re.sub(rb"[0-9a-f]{16,}", b"h", text))


class _Writes:
    """Bytes written to a local store, by key (a hook on zarr's LocalStore.set)."""

    def __init__(self, monkeypatch):
        from zarr.storage import LocalStore

        self.log: list[tuple[str, int]] = []
        original = LocalStore.set

        async def counting(store, key, value, *a, **k):
            raw = value.to_bytes()
            self.log.append((key, len(_counts_as_zero(raw) if key.endswith("zarr.json") else raw)))
            return await original(store, key, value, *a, **k)

        monkeypatch.setattr(LocalStore, "set", counting)

    def metadata(self) -> int:
        return sum(n for k, n in self.log if k.endswith("zarr.json"))


def test_a_commit_writes_the_same_metadata_whatever_the_store_holds(extractor, tmp_path, monkeypatch):
    """Two stores, one with 3x the rows and 10x the skipped files: adding one image writes the same
    metadata bytes to both (counts and hashes each read as one symbol). Skipped lists in the attributes that every
    commit rewrites (and the consolidated snapshot) made this grow with the store."""
    per_store = {}
    for tag, images, bad in (("small", 3, 2), ("large", 9, 20)):
        data = make_dataset(tmp_path / tag, splits={"train": images, "validation": 1})
        for i in range(bad):
            (data / "train" / "cats" / f"bad{i:03d}.jpg").write_text(f"not an image {i}")
        store = tmp_path / f"{tag}.zarr"
        _age(data)  # settled files: what the stat cache writes does not depend on the clock
        _extract(extractor, data, store, augment=1)
        assert len(FeatureStore(store).skipped("train")) == bad
        shutil.copy(data / "train" / "dogs" / "dogs.0.jpg", tmp_path / "x.jpg")
        with Image.open(tmp_path / "x.jpg") as im:
            im.rotate(90).save(data / "train" / "dogs" / "new.jpg")
        _age(data)
        writes = _Writes(monkeypatch)
        s = _extract(extractor, data, store, augment=1)
        monkeypatch.undo()
        assert s.rows_written == 2  # one commit of the new image's two rows, then the final commit
        per_store[tag] = writes.metadata()
    assert per_store["large"] == per_store["small"], per_store


def _bmp(path, seed, size=24):
    """An uncompressed image: a one-pixel change keeps the file's size."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path, "BMP")


def _bmp_dataset(root, n=4):
    for split, k in (("train", n), ("validation", 1)):
        for c, name in enumerate(("cats", "dogs")):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(k):
                _bmp(root / split / name / f"{i}.bmp", seed=100 * c + 10 * (split == "train") + i)
    _age(root)
    return root


def _shas(store):
    return set(FeatureStore(store).load("train", with_features=False).sha256)


def test_stat_cache_rehashes_exactly_what_changed(extractor, tmp_path):
    data = _bmp_dataset(tmp_path / "d")
    store = tmp_path / "f.zarr"
    s = _extract(extractor, data, store)
    assert (s.files_hashed, s.files_from_stat_cache) == (10, 0)
    s = _extract(extractor, data, store)
    assert (s.files_hashed, s.files_from_stat_cache, s.rows_written) == (0, 10, 0)  # nothing read

    target = data / "train" / "cats" / "0.bmp"
    st = os.stat(target)
    # same size, same mtime, new inode (a file replaced by a rename): new content, found
    raw = bytearray(target.read_bytes())
    raw[-1] ^= 0xFF
    tmp = data / "train" / "cats" / ".0.bmp.new"
    tmp.write_bytes(bytes(raw))
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(tmp, target)
    assert os.stat(target).st_size == st.st_size and os.stat(target).st_mtime_ns == st.st_mtime_ns
    before = _shas(store)
    s = _extract(extractor, data, store)
    assert (s.files_hashed, s.rows_written) == (1, 1) and len(_shas(store) - before) == 1

    # content unchanged, mtime touched: hashed again, nothing written
    os.utime(data / "train" / "dogs" / "1.bmp", (PAST + 5, PAST + 5))
    s = _extract(extractor, data, store)
    assert (s.files_hashed, s.rows_written) == (1, 0)

    # replaced in place by a different image (same inode, new size and ctime)
    with open(data / "train" / "dogs" / "2.bmp", "wb") as f:
        Image.fromarray(np.full((30, 30, 3), 7, np.uint8)).save(f, "BMP")
    os.utime(data / "train" / "dogs" / "2.bmp", (PAST, PAST))
    s = _extract(extractor, data, store)
    assert (s.files_hashed, s.rows_written) == (1, 1)

    # a deleted file leaves the cache; the rest stays trusted
    (data / "train" / "dogs" / "3.bmp").unlink()
    s = _extract(extractor, data, store)
    assert (s.files_hashed, s.files_from_stat_cache) == (0, 9)
    group = FeatureStore(store).root["train"]
    assert len(statcache.load(group)) == 7 and not any(p.endswith("dogs/3.bmp") for p in statcache.load(group))

    # --rehash reads everything; a file modified just now is hashed, and not cached until it settles
    r = run_cli("extract", "--model", extractor, "--data", data, "-o", store, "--chunk-rows", 4, "--quiet",
                "--rehash")
    assert r.returncode == 0 and "9 read and hashed, 0 unchanged" in r.stdout, r.stdout
    _bmp(data / "train" / "cats" / "fresh.bmp", seed=999)
    s = _extract(extractor, data, store)
    assert (s.files_hashed, s.rows_written) == (1, 1)
    s = _extract(extractor, data, store)
    assert s.files_hashed == 1  # still racy: its mtime is within datasets.RACY_SECONDS of the stat


def test_a_damaged_stat_cache_is_ignored_never_trusted(extractor, tmp_path):
    data = _bmp_dataset(tmp_path / "d")
    store = tmp_path / "f.zarr"
    _extract(extractor, data, store)
    import zarr

    g = zarr.open_group(str(store), path="train/bookkeeping/stat_cache", mode="r+", use_consolidated=False)
    shas = g["sha256"][:]
    g["sha256"][:] = shas[::-1]  # hashes swapped between files: the digest no longer matches
    s = _extract(extractor, data, store)
    assert (s.files_hashed, s.files_from_stat_cache, s.rows_written) == (8, 2, 0)  # train re-hashed, validation not


def test_skipped_files_and_runs_live_outside_the_attributes_and_old_stores_still_read(extractor, tmp_path):
    import json

    data = make_dataset(tmp_path / "d", splits={"train": 3, "validation": 1})
    (data / "train" / "cats" / "broken.jpg").write_text("no")
    store = tmp_path / "f.zarr"
    _extract(extractor, data, store)
    fs = FeatureStore(store)
    attrs = fs.attrs("train")
    assert "skipped" not in attrs and "runs" not in attrs
    assert list(fs.skipped("train")) == [str(data / "train" / "cats" / "broken.jpg")]
    assert fs.runs("train")[-1]["rows"] == 6
    r = run_cli("info", store)
    assert r.returncode == 0 and "broken.jpg" in r.stdout

    # a store written before: the lists were attributes of the split
    old = tmp_path / "old.zarr"
    shutil.copytree(store, old)
    for name in ("skipped_path", "skipped_reason", "run_log"):
        shutil.rmtree(old / "train" / "bookkeeping" / name)
    meta = json.loads((old / "train" / "zarr.json").read_text())
    meta["attributes"]["skipped"] = {"somewhere/old.jpg": "not an image"}
    meta["attributes"]["runs"] = [{"rows": 6, "seconds": 1.0}]
    (old / "train" / "zarr.json").write_text(json.dumps(meta))
    root = json.loads((old / "zarr.json").read_text())
    root.pop("consolidated_metadata", None)
    (old / "zarr.json").write_text(json.dumps(root))
    fs = FeatureStore(old)
    assert fs.skipped("train") == {"somewhere/old.jpg": "not an image"} and fs.runs("train")[0]["rows"] == 6
    assert "old.jpg" in run_cli("info", old).stdout
    s = _extract(extractor, data, old)  # extending it moves the list out of the attributes
    assert s.rows_written == 0 and list(FeatureStore(old).skipped("train")) == [str(data / "train" / "cats" /
                                                                                      "broken.jpg")]
    assert len(FeatureStore(old).runs("train")) == 1  # a run that wrote nothing records no cost


def test_copies_are_laid_out_copy_by_copy_and_k0_reads_only_its_chunks(extractor, tmp_path, monkeypatch):
    from zarr.storage import LocalStore

    data = make_dataset(tmp_path / "d", splits={"train": 8, "validation": 1})
    store = tmp_path / "f.zarr"
    _extract(extractor, data, store, augment=3)
    fs = FeatureStore(store)
    copy = fs.load("train", with_features=False).copy
    assert list(copy) == sorted(copy)  # one run: every copy 0, then every copy 1, ...
    assert (copy == 0).sum() == 16

    reads: list[str] = []
    original = LocalStore.get

    async def counting(self, key, *a, **k):
        reads.append(key)
        return await original(self, key, *a, **k)

    monkeypatch.setattr(LocalStore, "get", counting)
    k0 = FeatureStore(store).load("train", max_copy=0)
    feature_chunks = {k for k in reads if k.startswith("train/features/c/")}
    assert len(k0) == 16 and len(feature_chunks) == 16 // 4  # chunk_rows=4: only copy 0's four chunks
    reads.clear()
    blocks = list(FeatureStore(store).iter_blocks("train", max_copy=0, shuffle=True))
    assert sum(len(b) for b in blocks) == 16
    assert len({k for k in reads if k.startswith("train/features/c/")}) == 4
    monkeypatch.undo()
    full = FeatureStore(store).load("train")
    assert np.array_equal(full.features[full.copy == 0], k0.features)


def test_k0_load_on_a_damaged_copy_still_checks_what_it_reads(extractor, tmp_path):
    data = make_dataset(tmp_path / "d", splits={"train": 4, "validation": 1})
    store = tmp_path / "f.zarr"
    _extract(extractor, data, store, augment=2)
    chunks = sorted((store / "train" / "features" / "c").rglob("*"))
    files = [c for c in chunks if c.is_file()]
    files[-1].unlink()  # a chunk of the last copy: K = 0 never reads it
    assert len(FeatureStore(store).load("train", max_copy=0)) == 8
    files[0].unlink()  # a chunk of copy 0: refused, naming the rows
    with pytest.raises(Exception, match="damaged"):
        FeatureStore(store).load("train", max_copy=0)


def test_loaded_rows_use_the_stores_column_names_and_a_mistyped_flag_shows_the_stage_usage(extractor, tmp_path):
    data = make_dataset(tmp_path / "d", splits={"train": 2, "validation": 1})
    store = tmp_path / "f.zarr"
    _extract(extractor, data, store)
    d = FeatureStore(store).load("train")
    assert d.label.tolist() == [0, 0, 1, 1] and all(p.endswith(".jpg") for p in d.path)
    assert d.labels is d.label and d.paths is d.path  # the older names still answer
    r = run_cli("export", "-o", tmp_path / "m.onnx", "--no-such-flag")
    assert r.returncode == 2 and r.stderr.startswith("usage: convcache export") and "--no-such-flag" in r.stderr
