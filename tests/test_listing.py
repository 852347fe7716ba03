"""Never stale (issue 30): what a run trains on is the data as it is now. Photos moved to another class are
relabelled, deleted ones left out, new ones extracted (or named as missing), and a re-run says what changed."""

import shutil

import numpy as np
import pytest
from conftest import make_dataset, make_image, run_cli

from convcache.errors import ConvcacheError
from convcache.extract.runner import ExtractConfig, run_extract
from convcache.store import FeatureStore
from convcache.train.data import load_training_data


def extract(model, data, out, **kw):
    return run_extract(ExtractConfig(model=str(model), data=str(data), output=str(out), progress=False, **kw))


def churn(data):
    """Two cats become dogs, one dog is deleted, a new cat arrives."""
    for i in (0, 1):
        shutil.move(data / "train" / "cats" / f"cats.{i}.jpg", data / "train" / "dogs" / f"moved.{i}.jpg")
    (data / "train" / "dogs" / "dogs.5.jpg").unlink()
    make_image(data / "train" / "cats" / "new.0.jpg", seed=4242, kind=0)


def labels_by_path(d):
    return {p.rsplit("/", 1)[-1]: int(y) for p, y in zip(d.path, d.label)}


def test_extract_says_what_changed_and_reads_follow_the_folders(extractor, tmp_path):
    data = make_dataset(tmp_path / "data")
    out = tmp_path / "s.zarr"
    extract(extractor, data, out, augment=1)
    churn(data)
    s = extract(extractor, data, out, augment=1)
    assert str(s.changes["train"]) == "+1 new, 2 relabelled, 1 gone" and not s.changes["validation"]
    assert s.rows_written == 2 and s.inference_calls > 0  # the new photo's two copies, nothing else
    d = FeatureStore(out).load("train")
    got = labels_by_path(d)
    assert got["moved.0.jpg"] == got["moved.1.jpg"] == 1 and got["new.0.jpg"] == 0
    assert "dogs.5.jpg" not in got and len(d) == 12 * 2  # 12 photos now, copies 0 and 1
    raw = FeatureStore(out).load("train", current=False)
    assert len(raw) == 13 * 2  # the gone photo's rows stay in the cache, unread
    again = extract(extractor, data, out, augment=1)
    assert not again.changes["train"] and again.rows_written == 0
    r = run_cli("extract", "--model", extractor, "--data", data, "-o", out, "--augment", 1, "-q")
    assert r.returncode == 0 and "listing:" not in r.stdout  # nothing changed, nothing said


def test_train_trains_on_the_folders_as_they_are_now_without_a_new_extract(extractor, tmp_path):
    """Moved and deleted photos need no inference: train lists the data again and trains with the new labels.
    A new photo needs its features: train names the command that adds them."""
    data = make_dataset(tmp_path / "data")
    out = tmp_path / "s.zarr"
    extract(extractor, data, out)
    before = load_training_data(out)
    for i in (0, 1):
        shutil.move(data / "train" / "cats" / f"cats.{i}.jpg", data / "train" / "dogs" / f"moved.{i}.jpg")
    (data / "train" / "dogs" / "dogs.5.jpg").unlink()
    after = load_training_data(out)
    moved = {before.train.sha256[i] for i in range(len(before.train.y))
             if before.train.y[i] == 0}  # every cat, as extracted
    now = dict(zip(after.train.sha256, after.train.y.tolist()))
    assert len(now) == 11 and sum(1 for s in moved if now.get(s) == 1) == 2  # two cats train as dogs now
    assert after.provenance["listing"]["train"] != before.provenance["listing"]["train"]
    make_image(data / "train" / "cats" / "new.0.jpg", seed=4242, kind=0)
    with pytest.raises(ConvcacheError, match=r"1 photo\(s\) of 'train' are in the data but not in the store.*extract"):
        load_training_data(out)
    extract(extractor, data, out)
    assert len(load_training_data(out).train.y) == 12


def test_a_store_without_a_listing_reads_as_before(extractor, tmp_path):
    """Stores older than listings (no bookkeeping/listing): every committed row, with its stored label."""
    from convcache.store import listing

    data = make_dataset(tmp_path / "data")
    out = tmp_path / "s.zarr"
    extract(extractor, data, out)
    fs = FeatureStore(out)
    full = fs.load("train")
    fs._listings["train"] = None  # as an old store reads
    old = fs.load("train")
    np.testing.assert_array_equal(full.label, old.label)
    assert fs.status("train")["listed"] is None
    assert listing.changes(None, fs.listing("validation")).new == 8


def _files(store):
    return {p.relative_to(store).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(store.rglob("*")) if p.is_file()}


def test_a_run_that_finds_nothing_new_writes_nothing_but_the_snapshot(extractor, tmp_path, monkeypatch):
    """A re-run over unchanged folders rewrites no listing (a rewrite is a window in which a concurrent reader
    finds none, and reads every row as current), no skipped list, no split attribute: every file of the store
    is as it was, the root's snapshot refreshed to the same bytes; and it reads each node's metadata about
    twice. What did change is written: a rename within a class (the listing's paths), a bad file gone (the
    skipped list)."""
    monkeypatch.setattr("convcache.datasets.RACY_SECONDS", 0)  # fixtures written just now are in the stat cache
    data = make_dataset(tmp_path / "data", splits={"train": 4})
    (data / "train" / "cats" / "bad.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "s.zarr"
    extract(extractor, data, out)
    before = _files(out)
    from zarr.storage import LocalStore

    reads, get = [], LocalStore.get

    async def counted(self, key, *args, **kwargs):
        reads.append(key)
        return await get(self, key, *args, **kwargs)

    monkeypatch.setattr(LocalStore, "get", counted)
    again = extract(extractor, data, out)
    monkeypatch.setattr(LocalStore, "get", get)
    assert again.rows_written == 0 and again.skipped  # the bad file is still skipped, and still said
    # each node's metadata read about twice (the writer's checks, then the snapshot's walk), not once a look
    # (a plain zarr group reads it every time a member is named: 6x here, each a GET on object storage)
    nodes = sum(1 for k in before if k.endswith("zarr.json"))
    assert sum(k.endswith("zarr.json") for k in reads) <= 2 * nodes + 4, (len(reads), nodes)
    # each small column's one chunk read once: the check's pass, reused for its last block and for the plan
    # (it was read three times); and no look for zarr 2's metadata files (three misses an open)
    assert {c: sum(k.startswith(f"train/{c}/c/") for k in reads) for c in ("sha256", "copy", "image", "path")} == \
        {"sha256": 1, "copy": 1, "image": 1, "path": 1}, sorted(reads)
    assert not [k for k in reads if k.rsplit("/", 1)[-1] in (".zattrs", ".zgroup", ".zmetadata", ".zarray")]
    reads.clear()  # a training job's read (the snapshot, then its check of the split's own metadata): each once
    monkeypatch.setattr(LocalStore, "get", counted)
    FeatureStore(out).load("train")
    monkeypatch.setattr(LocalStore, "get", get)
    assert sum(k.endswith("zarr.json") for k in reads) <= nodes, sorted(reads)
    after = _files(out)
    assert after.keys() == before.keys()
    assert {k for k in after if after[k] != before[k]} <= {"zarr.json"}  # only the root's snapshot: rewritten,
    assert after["zarr.json"][0] == before["zarr.json"][0]                # to the same bytes
    assert list(FeatureStore(out).skipped("train")) == [str(data / "train" / "cats" / "bad.jpg")]
    (data / "train" / "cats" / "cats.0.jpg").rename(data / "train" / "cats" / "renamed.jpg")
    (data / "train" / "cats" / "bad.jpg").unlink()
    extract(extractor, data, out)
    fs = FeatureStore(out)
    assert "renamed.jpg" in labels_by_path(fs.load("train")) and fs.skipped("train") == {}


def test_a_snapshot_left_behind_by_a_killed_run_is_brought_level_by_a_run_with_nothing_to_do(extractor, tmp_path):
    """A run killed after its last commit and before its consolidation leaves the root's snapshot (what
    FeatureStore and xarray read) behind the split. The next run, though it has nothing to extract, refreshes it."""
    data = make_dataset(tmp_path / "data", splits={"train": 3})
    out = tmp_path / "s.zarr"
    extract(extractor, data, out)
    old_root = (out / "zarr.json").read_bytes()
    make_image(data / "train" / "cats" / "new.0.jpg", seed=4242, kind=0)
    extract(extractor, data, out)
    (out / "zarr.json").write_bytes(old_root)  # as if killed before the last consolidation
    assert FeatureStore(out).rows("train") == 6
    assert extract(extractor, data, out).rows_written == 0
    assert FeatureStore(out).rows("train") == 7 and "new.0.jpg" in labels_by_path(FeatureStore(out).load("train"))


def test_a_listing_that_is_not_whole_is_a_clear_error_for_readers_not_stale_rows(extractor, tmp_path):
    """A listing being rewritten (or left half-written by a killed run) is not whole: reading every row as
    current, as before, served moved and deleted photos' rows with their old labels. Readers now say so in one
    line; the next extract writes it again and reads follow it."""
    import zarr

    data = make_dataset(tmp_path / "data", splits={"train": 3})
    out = tmp_path / "s.zarr"
    extract(extractor, data, out)
    (data / "train" / "dogs" / "dogs.0.jpg").unlink()
    extract(extractor, data, out)  # the listing now leaves dogs.0's rows out
    g = zarr.open_group(str(out), mode="a", path="train/bookkeeping/listing", use_consolidated=False)
    g.update_attributes({"digest": None})  # as `listing.save` marks it while it writes
    zarr.consolidate_metadata(str(out))
    with pytest.raises(ConvcacheError, match="'train' split's listing is not whole"):
        FeatureStore(out).load("train")
    r = run_cli("train", "--features", out, "--head", "logreg", "-o", tmp_path / "h")
    assert r.returncode == 2 and "listing is not whole" in r.stderr and "Traceback" not in r.stderr
    extract(extractor, data, out)
    assert "dogs.0.jpg" not in labels_by_path(FeatureStore(out).load("train"))


def test_a_reader_waits_for_a_listing_its_writer_is_rewriting_and_not_for_a_killed_one(extractor, tmp_path,
                                                                                    monkeypatch):
    """A listing met mid-rewrite while the store's writer is at work is waited for, and read from the split's
    own metadata once whole (the reader's snapshot still says it is not); with no writer (a killed run's), the
    one-line error at once; past the wait, the error says how long it waited."""
    import threading
    import time

    import zarr

    from convcache.store import reader
    from convcache.store.lease import writer_lock

    data = make_dataset(tmp_path / "data", splits={"train": 3})
    out = tmp_path / "s.zarr"
    extract(extractor, data, out)
    g = zarr.open_group(str(out), mode="a", path="train/bookkeeping/listing", use_consolidated=False)
    whole = g.attrs["digest"]
    g.update_attributes({"digest": None})  # as `listing.save` marks it while it writes
    zarr.consolidate_metadata(str(out))  # every reader's snapshot from here on says: not whole
    with pytest.raises(ConvcacheError, match="listing is not whole") as no_writer:
        FeatureStore(out).listing("train")
    assert "after waiting" not in str(no_writer.value)

    held, finished = threading.Event(), threading.Event()

    def writer():
        with writer_lock(str(out)):
            held.set()
            time.sleep(0.5)
            g.update_attributes({"digest": whole})  # whole in the split's metadata; the snapshot not refreshed
            finished.set()

    t = threading.Thread(target=writer)
    t.start()
    held.wait()
    got = FeatureStore(out).listing("train")
    t.join()
    assert finished.is_set() and got is not None and len(got) == 6 and got.digest == whole

    g.update_attributes({"digest": None})
    monkeypatch.setattr(reader, "LISTING_WAIT_SECONDS", 0.3)
    with writer_lock(str(out)), pytest.raises(ConvcacheError, match="not whole .* after waiting 0 s for its writer"):
        FeatureStore(out).listing("train")

    from convcache.location import resolve
    from convcache.store.lease import writer_active

    remote = resolve("memory://bucket/w.zarr", None, what="store")  # object storage: the lease says
    assert not writer_active(remote)
    with writer_lock("memory://bucket/w.zarr"):
        assert writer_active(remote)
    assert not writer_active(remote)
