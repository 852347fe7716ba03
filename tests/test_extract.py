import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import SIZE, make_dataset, make_image, run_cli
from PIL import Image

from convcache.augment import AugmentPolicy, augment, draw_params
from convcache.errors import ConvcacheError
from convcache.extract import FeatureStore
from convcache.extract.runner import ExtractConfig, run_extract
from convcache.imaging import decode_image


def extract(model, data, out, **kw):
    kw.setdefault("progress", False)
    return run_extract(ExtractConfig(model=str(model), data=str(data), output=str(out), **kw))


def arrays(path):
    store = FeatureStore(path)
    out = {}
    for split in store.splits:
        d = store.load(split)
        out[split] = (d.features, d.labels, d.image, d.copy, d.sha256, d.paths)
    return out


def assert_same_store(a, b):
    A, B = arrays(a), arrays(b)
    assert A.keys() == B.keys()
    for split in A:
        for x, y in zip(A[split], B[split]):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture
def dataset(tmp_path):
    return make_dataset(tmp_path / "data")


def test_augmentation_is_deterministic_and_changes_pixels():
    img = np.random.default_rng(0).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
    p = AugmentPolicy()
    assert augment(img, p, 0, "ab" * 32, 0) is img
    a1, a2 = augment(img, p, 0, "ab" * 32, 1), augment(img, p, 0, "ab" * 32, 1)
    np.testing.assert_array_equal(a1, a2)
    assert not np.array_equal(a1, img)
    assert draw_params(p, 0, "ab" * 32, 1) != draw_params(p, 0, "ab" * 32, 2)
    assert draw_params(p, 0, "ab" * 32, 1) != draw_params(p, 1, "ab" * 32, 1)
    q = draw_params(p, 0, "cd" * 32, 3)
    assert abs(q["theta"]) <= 40 and 0.8 <= q["zx"] <= 1.2 and abs(q["tx"]) <= 0.2


def test_identity_policy_keeps_pixels():
    img = np.random.default_rng(0).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
    none = AugmentPolicy(0, 0, 0, 0, 0, False)
    np.testing.assert_array_equal(augment(img, none, 0, "ab" * 32, 1), img)


def test_extract_layout_and_provenance(extractor, dataset, tmp_path):
    s = extract(extractor, dataset, tmp_path / "f.zarr", augment=2)
    assert s.rows_written == 2 * 6 * 3 + 2 * 4 and not s.skipped
    store = FeatureStore(tmp_path / "f.zarr")
    assert store.splits == ["train", "validation"] and store.classes == ["cats", "dogs"]
    train = store.load("train")
    assert train.features.shape == (36, 1, 1, 512)
    assert sorted(set(train.copy.tolist())) == [0, 1, 2]
    assert set(store.load("validation").copy.tolist()) == {0}
    assert len(store.load("train", max_copy=1)) == 24
    # Rows of one image share its index, label, hash and path.
    for i in set(train.image.tolist()):
        rows = np.flatnonzero(train.image == i)
        assert len(rows) == 3 and len({train.sha256[r] for r in rows}) == 1
    attrs = store.attrs("train")
    assert attrs["extractor"]["metadata"]["kind"] == "extractor" and len(attrs["extractor"]["sha256"]) == 64
    assert attrs["augment"]["policy"] == AugmentPolicy().to_dict() and attrs["augment"]["seed"] == 0
    assert attrs["classes"] == ["cats", "dogs"] and "zarr" in attrs["versions"]
    # Copies really differ from the original in feature space.
    assert not np.allclose(train.features[train.copy == 0], train.features[train.copy == 1])


@pytest.mark.slow
def test_same_seed_same_features_across_workers_and_batches(extractor, dataset, tmp_path):
    extract(extractor, dataset, tmp_path / "a.zarr", augment=2, workers=1, batch_size=4)
    extract(extractor, dataset, tmp_path / "b.zarr", augment=2, workers=2, batch_size=4)
    assert_same_store(tmp_path / "a.zarr", tmp_path / "b.zarr")
    extract(extractor, dataset, tmp_path / "c.zarr", augment=2, workers=2, batch_size=7)
    a, c = FeatureStore(tmp_path / "a.zarr").load("train"), FeatureStore(tmp_path / "c.zarr").load("train")
    np.testing.assert_allclose(a.features, c.features, rtol=1e-5, atol=1e-5)
    extract(extractor, dataset, tmp_path / "d.zarr", augment=2, seed=9)
    d = FeatureStore(tmp_path / "d.zarr").load("train")
    assert not np.allclose(a.features[a.copy == 1], d.features[d.copy == 1])


def test_warp_maps_made_where_the_image_decodes_give_the_dask_paths_bytes(dataset):
    """decode_base computes the copies' warp maps beside the decode (in a worker process, off the extracting
    process's GIL); the warps made from them equal decode_copies' (the Dask path: decode and augment in one
    call) byte for byte, for the copies asked for and for one that was not."""
    import hashlib

    from convcache.augment import AugmentPolicy
    from convcache.datasets import discover
    from convcache.extract.mapper import DecodeSpec, decode_base, decode_copies, warp_copy

    item = sorted(discover(str(dataset))[0], key=lambda i: i.path)[0]
    sha = hashlib.sha256(Path(item.path).read_bytes()).hexdigest()
    spec = DecodeSpec(SIZE, AugmentPolicy(), seed=3)
    base = decode_base(item, sha, spec, (0, 1, 2, 5))
    assert base.error is None and set(base.matrices) == {0, 1, 2, 5} and base.matrices[0] is None
    want = decode_copies(item, sha, [0, 1, 2, 5, 7], spec).images
    got = [warp_copy(base, sha, c, spec) for c in (0, 1, 2, 5, 7)]
    assert all(np.array_equal(a, b) for a, b in zip(want, got)) and not np.array_equal(got[1], got[2])
    assert decode_base(item, "0" * 64, spec).error == "changed while reading"


def test_each_image_is_decoded_once_per_run_and_the_rows_are_the_same_bytes(extractor, dataset, tmp_path):
    """Copies are warps of one decode (issue 29): 20 images x 3 train copies decode 20 times, not 44; in worker
    processes, in threads, or without the decode cache (every copy decoded, as before), the stores are bitwise
    equal, and rows stay copy-major."""
    once = extract(extractor, dataset, tmp_path / "once.zarr", augment=2, decode_in="threads")
    assert once.decodes == 20 and once.rows_written == 12 * 3 + 8
    again = extract(extractor, dataset, tmp_path / "every.zarr", augment=2, decode_in="threads", decode_cache_mb=0)
    assert again.decodes == 12 * 3 + 8
    procs = extract(extractor, dataset, tmp_path / "procs.zarr", augment=2, decode_in="processes", workers=2)
    assert procs.decodes == 20
    # a cache for 5 images: the first 5 train images are kept for all their copies, the other 7 decoded for
    # each of their 3 (the look-ahead is 4 x 2 workers, so the 12 copy-0 rows are consumed before copy 1 asks)
    some = extract(extractor, dataset, tmp_path / "some.zarr", augment=2, decode_in="threads", workers=2,
                   decode_cache_mb=5 * SIZE * SIZE * 3 / 2**20)
    assert some.decodes == 5 + 7 * 3 + 8
    assert_same_store(tmp_path / "once.zarr", tmp_path / "some.zarr")
    assert_same_store(tmp_path / "once.zarr", tmp_path / "every.zarr")
    assert_same_store(tmp_path / "once.zarr", tmp_path / "procs.zarr")
    train = FeatureStore(tmp_path / "procs.zarr").load("train")
    assert train.copy.tolist() == [0] * 12 + [1] * 12 + [2] * 12  # copy-major
    runs = FeatureStore(tmp_path / "procs.zarr").runs("train")
    assert runs[-1]["decode_in"] == "processes" and runs[-1]["math"] == "fp32"


def test_every_row_is_the_extractor_on_its_own_copy_warped_one_copy_at_a_time(extractor, dataset, tmp_path):
    """Decoding in threads, the warp maps are computed ahead of the decodes, hundreds of rows' at once
    (`mapper.maps_of`): each stored row is still the extractor on its own copy, as the scalar path makes it
    (`augment`: one copy's parameters and matrix at a time), and not another copy's."""
    import onnxruntime as ort

    extract(extractor, dataset, tmp_path / "s.zarr", augment=3, decode_in="threads")
    train = FeatureStore(tmp_path / "s.zarr").load("train")
    session = ort.InferenceSession(str(extractor), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    policy = AugmentPolicy()
    assert sorted(set(train.copy.tolist())) == [0, 1, 2, 3]
    for k in range(len(train.copy)):
        pixels = decode_image(Path(train.paths[k]).read_bytes(), SIZE)
        own = [augment(pixels, policy, 0, train.sha256[k], c) for c in range(4)]
        got = session.run(None, {name: np.stack(own).astype(np.float32)})[0].reshape(4, -1)
        row = np.asarray(train.features[k]).reshape(-1)
        errors = np.abs(got - row).max(axis=1) / np.abs(got).max()
        c = int(train.copy[k])
        assert errors[c] < 1e-5, (k, c, errors)
        assert all(errors[x] > 1e-3 for x in range(4) if x != c), (k, c, errors)


def test_each_file_is_read_once_per_run_and_decoded_from_the_bytes_hashed(extractor, dataset, tmp_path,
                                                                            monkeypatch):
    """Decoding in threads, the bytes read to hash a file are the ones decoded (kept from hashing to the rows'
    phase: here with no decoding in the hashing pass, which would decode them there): 20 files are read 20
    times, not 40 (with no budget for them: 40); the stores are bitwise equal. A file rewritten after it was
    hashed is stored as it was hashed (its row and its sha256 agree), not skipped as changed."""
    from convcache.extract import engine, mapper

    reads = []
    real_read = mapper.read_bytes
    monkeypatch.setattr(mapper, "read_bytes", lambda path, *a, **k: reads.append(path) or real_read(path, *a, **k))
    monkeypatch.setattr(engine, "EARLY_DECODE_BYTES", 0)
    once = extract(extractor, dataset, tmp_path / "once.zarr", augment=2, decode_in="threads")
    assert len(reads) == 20 and len(set(reads)) == 20 and once.decodes == 20
    reads.clear()
    monkeypatch.setattr(engine, "READ_ONCE_BYTES", 0)
    twice = extract(extractor, dataset, tmp_path / "twice.zarr", augment=2, decode_in="threads")
    assert len(reads) == 40 and twice.decodes == 20
    assert_same_store(tmp_path / "once.zarr", tmp_path / "twice.zarr")
    monkeypatch.undo()

    changed = tmp_path / "changed"
    make_dataset(changed)
    first = sorted((changed / "train" / "cats").iterdir())[0]
    real_plan = engine.plan_rows

    def plan_then_rewrite(*a, **k):  # hashed, not yet decoded: the file now holds another photo
        first.write_bytes(b"".join(p.read_bytes() for p in sorted((changed / "train" / "dogs").iterdir())[:1]))
        return real_plan(*a, **k)

    monkeypatch.setattr(engine, "plan_rows", plan_then_rewrite)
    got = extract(extractor, changed, tmp_path / "changed.zarr", decode_in="threads")
    assert not got.skipped
    monkeypatch.undo()
    make_dataset(tmp_path / "unchanged")
    extract(extractor, tmp_path / "unchanged", tmp_path / "unchanged.zarr", decode_in="threads")
    a, b = arrays(tmp_path / "changed.zarr"), arrays(tmp_path / "unchanged.zarr")
    for split in a:
        for x, y in zip(a[split][:5], b[split][:5]):  # features, labels, image, copy, sha256 (not the paths)
            np.testing.assert_array_equal(x, y)


def test_photos_still_needed_are_decoded_as_they_are_hashed_once_and_a_bad_one_is_still_skipped(
        extractor, dataset, tmp_path, monkeypatch):
    """Decoding in threads, a photo whose rows are still to be extracted is decoded by the thread that hashed it
    (its bytes just read), once: 20 decodes, all of them before the plan, and the store is bitwise the one
    decoded in the rows' phase. A re-run that must hash every file again (its stat cache gone) but holds every
    row decodes nothing; a file that does not decode is skipped with its reason, as before."""
    import zarr

    from convcache.extract import engine, mapper

    calls, by_hashing = [], []
    real_decode, real_hash = mapper.decode_image, engine.LocalExecutor.hash_files

    def hash_files(self, *a, **k):  # how many decodes each hashing pass made
        before = len(calls)
        out = real_hash(self, *a, **k)
        by_hashing.append(len(calls) - before)
        return out

    monkeypatch.setattr(mapper, "decode_image", lambda *a, **k: calls.append(1) or real_decode(*a, **k))
    monkeypatch.setattr(engine.LocalExecutor, "hash_files", hash_files)
    early = extract(extractor, dataset, tmp_path / "early.zarr", augment=2, decode_in="threads")
    assert len(calls) == 20 and early.decodes == 20 and by_hashing == [12, 8]  # all of train's, then validation's
    calls.clear(), by_hashing.clear()
    monkeypatch.setattr(engine, "EARLY_DECODE_BYTES", 0)
    late = extract(extractor, dataset, tmp_path / "late.zarr", augment=2, decode_in="threads")
    assert len(calls) == 20 and late.decodes == 20 and by_hashing == [0, 0]
    assert_same_store(tmp_path / "early.zarr", tmp_path / "late.zarr")
    monkeypatch.setattr(engine, "EARLY_DECODE_BYTES", 256 << 20)

    for split in ("train", "validation"):  # every file must be hashed again; every row is there
        del zarr.open_group(str(tmp_path / "early.zarr"), mode="a", path=f"{split}/bookkeeping")["stat_cache"]
    calls.clear()
    again = extract(extractor, dataset, tmp_path / "early.zarr", augment=2, decode_in="threads")
    assert again.files_hashed == 20 and again.rows_written == 0 and calls == [] and again.decodes == 0

    bad = dataset / "train" / "cats" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
    got = extract(extractor, dataset, tmp_path / "bad.zarr", augment=2, decode_in="threads")
    assert list(got.skipped) == [str(bad)] and "image" in got.skipped[str(bad)] and got.rows_written == 44


def test_a_decoding_process_killed_mid_run_loses_no_image(extractor, dataset, tmp_path, monkeypatch, caplog):
    """A decoding process killed (SIGKILL, as the OOM killer does) right after the first task is sent breaks the
    pool: every task in flight fails. The pool is replaced, the images of the failed tasks are decoded again
    alone, later tasks go to the new pool, and the store is bitwise a threads run's, nothing skipped."""
    from convcache.extract import engine

    real, killed = engine._Group._send, []

    def send_then_kill(self):
        real(self)
        procs = self._executor._procs
        deadline = time.time() + 60
        while not killed and len(getattr(procs, "_processes", None) or {}) < 2 and time.time() < deadline:
            time.sleep(0.01)
        if not killed:
            pid = next(iter(procs._processes))
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    monkeypatch.setattr(engine._Group, "_send", send_then_kill)
    hit = extract(extractor, dataset, tmp_path / "hit.zarr", augment=2, decode_in="processes", workers=2)
    assert killed and not hit.skipped and hit.rows_written == 12 * 3 + 8
    assert "a decoding process died" in caplog.text
    monkeypatch.undo()
    extract(extractor, dataset, tmp_path / "threads.zarr", augment=2, decode_in="threads")
    assert_same_store(tmp_path / "hit.zarr", tmp_path / "threads.zarr")


def test_a_script_without_a_main_guard_gets_one_clear_error_not_endless_respawns(extractor, dataset, tmp_path):
    """Decoding processes start by importing the script that started them: one that runs an extract at its top
    level (no `if __name__ == "__main__":`) makes every new process fail as it starts. That was pool after pool
    replaced and every image lost in a process of its own (minutes, then a traceback); now one error, at once."""
    script = tmp_path / "noguard.py"
    script.write_text("from convcache.extract.runner import ExtractConfig, run_extract\n"
                      f"run_extract(ExtractConfig(model={str(extractor)!r}, data={str(dataset)!r}, "
                      f"output={str(tmp_path / 'out.zarr')!r}, augment=1, progress=False, workers=2, "
                      "decode_in='processes'))\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode != 0
    assert "ConvcacheError: the decoding processes could not start" in r.stderr
    assert 'if __name__ == "__main__":' in r.stderr and "a decoding process died" not in r.stderr


def test_commits_wait_out_their_own_cost_end_on_chunk_boundaries_and_change_no_byte(extractor, dataset, tmp_path,
                                                                                     monkeypatch):
    """Finished blocks are committed at the last chunk boundary they reach, but a boundary reached sooner than
    COMMIT_COST_RATIO x the last commit's time waits (with wide features a commit a chunk was most of the run),
    unless HOLD_BYTES are held. Every cadence gives the same store, and every commit but a split's last ends on
    a chunk boundary."""
    from convcache.extract import engine
    from convcache.store.writer import SplitWriter

    stops, real = [], SplitWriter.commit_blocks
    monkeypatch.setattr(SplitWriter, "commit_blocks", lambda self, blocks: stops.append(
        (self.split, blocks[-1][1], self.chunk_rows)) or real(self, blocks))
    monkeypatch.setattr(engine.LocalExecutor, "commit_seconds", 1e9)  # no timer: boundaries and the end only
    runs = {"every boundary": (0, engine.HOLD_BYTES), "cost waits": (1e9, engine.HOLD_BYTES),
            "bytes cap": (1e9, 1)}
    counts = {}
    for name, (ratio, cap) in runs.items():
        monkeypatch.setattr(engine, "COMMIT_COST_RATIO", ratio)
        monkeypatch.setattr(engine, "HOLD_BYTES", cap)
        stops.clear()
        extract(extractor, dataset, tmp_path / f"{name}.zarr", augment=2, batch_size=4, chunk_rows=2)
        counts[name] = len(stops)
        last = {split: stop for split, stop, _ in stops}
        assert all(stop % chunk == 0 or stop == last[split] for split, stop, chunk in stops), (name, stops)
    assert counts["cost waits"] == 4  # a split's first boundary (no cost known yet) and its end: train, validation
    assert counts["every boundary"] > 10 and counts["bytes cap"] > 10, counts
    assert_same_store(tmp_path / "every boundary.zarr", tmp_path / "cost waits.zarr")
    assert_same_store(tmp_path / "every boundary.zarr", tmp_path / "bytes cap.zarr")


def test_batches_carry_each_rows_own_pixels_whatever_the_batch_size(extractor, dataset, tmp_path, monkeypatch):
    """The batcher (rows filled into two reused buffers by the staging thread while the batch before runs) gives
    every row its own pixels: with a session whose features are each row's pixel mean, 44 rows in batches of 3
    (buffers reused 7 times) or in one batch give the same store, row for row, and rows differ."""
    from convcache.extract import engine

    def means(self, staged):
        m = np.asarray(staged, np.float64).reshape(len(staged), -1).mean(1).astype(np.float32)
        return {v: np.broadcast_to(m.reshape(-1, *[1] * len(shape)), (len(m), *shape)).copy()
                for v, shape in engine.store_variables(self.contract).items()}

    monkeypatch.setattr(engine.ExtractorSession, "run_staged", means)
    for name, batch in (("three", 3), ("one", 64)):
        extract(extractor, dataset, tmp_path / f"{name}.zarr", augment=2, device="null", batch_size=batch,
                decode_in="threads")
    assert_same_store(tmp_path / "three.zarr", tmp_path / "one.zarr")
    feats = np.asarray(FeatureStore(tmp_path / "three.zarr").load("train").features).reshape(36, -1)[:, 0]
    assert len(np.unique(feats)) > 30


def test_decoding_processes_exit_when_the_extract_is_killed(extractor, tmp_path):
    """kill -9 of an extract must not leave its decoding processes behind (a pool's workers hold their own call
    queue's write end, so without a watch on the parent they wait for work forever)."""
    script = ("import os, sys, time\n"
              "from convcache.extract.engine import ExtractorSession, LocalExecutor\n"
              "if __name__ == '__main__':\n"
              f"    ex = LocalExecutor(ExtractorSession({str(extractor)!r}, 'null'), 2, 'processes')\n"
              "    ex._start_processes()\n"
              "    while len(ex._procs._processes) < 2: time.sleep(0.05)\n"
              "    print(*ex._procs._processes, flush=True)\n"
              "    time.sleep(600)\n")
    (tmp_path / "hold.py").write_text(script)
    p = subprocess.Popen([sys.executable, str(tmp_path / "hold.py")], stdout=subprocess.PIPE, text=True)
    pids = [int(x) for x in p.stdout.readline().split()]
    assert len(pids) == 2 and all(_alive(pid) for pid in pids)
    p.kill()
    p.wait()
    deadline = time.time() + 20
    while any(_alive(pid) for pid in pids) and time.time() < deadline:
        time.sleep(0.1)
    left = [pid for pid in pids if _alive(pid)]
    for pid in left:  # not to leave them to the rest of the suite
        os.kill(pid, signal.SIGKILL)
    assert not left, f"decoding processes {left} outlived their extract"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def test_a_resume_on_another_provider_or_math_mode_is_refused_without_allow_mixed(extractor, dataset, tmp_path):
    """Rows from two math modes are not bitwise comparable: a split made in fp32, extended by a run in fp16
    (`--precision fp16`, run here on the CPU), is refused with a one-line reason unless --allow-mixed, and the
    refusal writes nothing; with it, the store records both."""
    out = tmp_path / "m.zarr"
    extract(extractor, dataset, out, augment=0)
    with pytest.raises(ConvcacheError, match="not be bitwise comparable.*--allow-mixed"):
        extract(extractor, dataset, out, augment=1, precision="fp16")
    assert FeatureStore(out).rows("train") == 12 and FeatureStore(out).load("train").copy.max() == 0
    s = extract(extractor, dataset, out, augment=1, allow_mixed=True, precision="fp16")
    assert s.rows_written == 12 and s.math == "fp16"
    assert [r["math"] for r in FeatureStore(out).runs("train")] == ["fp32", "fp16"]
    from convcache.store.info import describe_store

    made = describe_store(str(out))["splits"]["train"]["made_on"]
    assert made == ["CPUExecutionProvider (fp16)", "CPUExecutionProvider (fp32)"]


def test_bound_io_feeds_uint8_and_gives_the_plain_runs_features_bitwise(extractor, dataset, tmp_path):
    """The CUDA path's IO (issue 29), run on the CPU: uint8 pixels through a Cast in front of the graph and IO
    binding (staged on one thread, run on another) write the same bytes as session.run on float32, and a
    store started one way resumes the other way (same provider, same math)."""
    from convcache.extract.engine import ExtractorSession

    plain = ExtractorSession(str(extractor), "cpu", io="plain")
    bound = ExtractorSession(str(extractor), "cpu", io="bound")
    assert bound.input_dtype == np.uint8 and bound.session.get_inputs()[0].type == "tensor(uint8)"
    x = np.random.default_rng(0).integers(0, 256, (5, SIZE, SIZE, 3)).astype(np.uint8)
    a, b = plain(x), bound(x)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    for way in ("plain", "bound"):
        extract(extractor, dataset, tmp_path / f"{way}.zarr", augment=2, io=way, batch_size=5)
    p, q = FeatureStore(tmp_path / "plain.zarr").load("train"), FeatureStore(tmp_path / "bound.zarr").load("train")
    assert np.array_equal(p.features, q.features) and len(p.features) == 36
    extract(extractor, dataset, tmp_path / "mixed.zarr", augment=1, io="bound", batch_size=5)
    s = extract(extractor, dataset, tmp_path / "mixed.zarr", augment=2, io="plain")  # no refusal: same math
    r = FeatureStore(tmp_path / "mixed.zarr").load("train")
    assert s.rows_written == 12 and np.array_equal(r.features, p.features)


def test_fp16_runs_the_fp32_extractor_in_fp16_close_to_fp32(extractor):
    """--precision fp16 converts the fp32 graph in memory (the graph export --precision fp16 stores): its
    features are within fp16's rounding of fp32's, recorded as math mode fp16; an extractor that is not
    fp32 is refused, as is fp16 where ONNX Runtime does not run (OpenVINO, null)."""
    from convcache.extract.engine import ExtractorSession

    x = np.random.default_rng(1).integers(0, 256, (4, SIZE, SIZE, 3)).astype(np.float32)
    f32 = ExtractorSession(str(extractor), "cpu")
    f16 = ExtractorSession(str(extractor), "cpu", precision="fp16")
    (a,), (b,) = f32(x).values(), f16(x).values()
    assert f32.math == "fp32" and f16.math == "fp16" and not np.array_equal(a, b)
    assert np.abs(a - b).max() <= 2e-2 * np.abs(a).max()
    with pytest.raises(ConvcacheError, match="not --device null"):
        ExtractorSession(str(extractor), "null", precision="fp16")


def test_the_runtime_starts_up_while_the_files_hash_and_its_failure_comes_before_any_row(extractor, dataset,
                                                                                          tmp_path, monkeypatch):
    """The runtime's session is created beside discovery and hashing, not before them (issue 29: CUDA's set-up): a
    session that cannot finish starting until the hashing has begun. A session that fails to start fails the run
    with its one-line error before any row is written, the hashing kept (the stat cache), and a re-run extracts
    every row, bitwise a run's whose session started first, without hashing those files again."""
    import threading

    import convcache.extract.engine as engine

    monkeypatch.setattr("convcache.datasets.RACY_SECONDS", 0)  # fixtures written just now are in the stat cache
    hashing, real_hash, real_create = threading.Event(), engine.LocalExecutor.hash_files, engine.create_session
    before = extract(extractor, dataset, tmp_path / "before.zarr", augment=1)  # the session made before hashing

    def hash_files(self, *args, **kw):
        hashing.set()
        return real_hash(self, *args, **kw)

    def create_session(*args, **kw):
        assert hashing.wait(20), "the session was made before any file was hashed"
        return real_create(*args, **kw)

    def broken(*args, **kw):
        hashing.wait(20)
        raise ConvcacheError("cannot load the model in ONNX Runtime: a broken runtime")

    monkeypatch.setattr(engine.LocalExecutor, "hash_files", hash_files)
    monkeypatch.setattr(engine, "create_session", create_session)
    s = extract(extractor, dataset, tmp_path / "a.zarr", augment=1)
    assert s.rows_written == before.rows_written == 32 and s.phases["session"] > 0 and s.phases["session_warm"] == 0
    assert_same_store(tmp_path / "before.zarr", tmp_path / "a.zarr")
    hashing.clear()
    monkeypatch.setattr(engine, "create_session", broken)
    with pytest.raises(ConvcacheError, match="a broken runtime"):
        extract(extractor, dataset, tmp_path / "b.zarr", augment=1)
    assert FeatureStore(tmp_path / "b.zarr").rows("train") == 0
    import zarr

    assert "devices" not in zarr.open_group(str(tmp_path / "b.zarr"), path="train").attrs  # no row, no device
    monkeypatch.setattr(engine, "create_session", create_session)
    again = extract(extractor, dataset, tmp_path / "b.zarr", augment=1)
    assert again.rows_written == 32 and again.files_from_stat_cache == 12
    assert_same_store(tmp_path / "before.zarr", tmp_path / "b.zarr")


def test_a_cuda_provider_that_cannot_start_is_an_error_never_a_cpu_run_recorded_as_cuda(extractor, dataset, tmp_path,
                                                                                        monkeypatch):
    """ONNX Runtime with a CUDA provider whose libraries do not load falls back to the CPU silently. The run's
    provider is known before its runtime starts (CUDA, TF32 for `--device auto` here), so such a run must never
    compute on the CPU under that name: it is a one-line error at the first batch, saying what to do, with no
    row written and no device recorded; `--device cpu` then runs."""
    import onnxruntime as ort

    import convcache.runtime as runtime

    real = ort.InferenceSession

    def falls_back(path, options=None, providers=None):  # what ORT does without the CUDA libraries
        return real(path, options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(runtime.ort, "get_available_providers", lambda: ["CUDAExecutionProvider",
                                                                         "CPUExecutionProvider"])
    monkeypatch.setattr(runtime.ort, "InferenceSession", falls_back)
    out = tmp_path / "f.zarr"
    with pytest.raises(ConvcacheError, match="could not start it .*--device cpu runs on the CPU"):
        extract(extractor, dataset, out, device="auto")
    import zarr

    assert FeatureStore(out).rows("train") == 0 and "devices" not in zarr.open_group(str(out), path="train").attrs
    s = extract(extractor, dataset, out, device="cpu")
    assert s.rows_written == 20 and [r["provider"] for r in FeatureStore(out).runs("train")] == ["CPUExecutionProvider"]


def test_a_warm_up_pass_runs_in_the_start_up_uncounted_and_changes_no_feature(extractor):
    """On CUDA the start-up also makes one pass at the run's batch size (kernels loaded, memory grown, bound
    buffers made) beside the hashing; here forced on the CPU, bound and plain: it runs before the session is
    ready, is not counted as a call, and the features after it are the same bytes as without it."""
    from convcache.extract.engine import ExtractorSession

    x = np.random.default_rng(2).integers(0, 256, (3, SIZE, SIZE, 3)).astype(np.uint8)
    for way in ("plain", "bound"):
        cold = ExtractorSession(str(extractor), "cpu", io=way)
        warm = ExtractorSession(str(extractor), "cpu", io=way, background=True, warm_batch=3)
        a, b = cold(x), warm(x)
        assert cold.warm_seconds == 0 and 0 < warm.warm_seconds <= warm.create_seconds and warm.calls == 1
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_the_batch_size_follows_the_device_unless_given(extractor, dataset, tmp_path):
    from convcache.runtime import batch_size_for

    assert batch_size_for("CUDAExecutionProvider") == 256 and batch_size_for("CPUExecutionProvider") == 32
    s = extract(extractor, dataset, tmp_path / "a.zarr", augment=0)
    assert s.batch_size == 32 and FeatureStore(tmp_path / "a.zarr").runs("train")[-1]["batch_size"] == 32
    assert extract(extractor, dataset, tmp_path / "b.zarr", augment=0, batch_size=7).batch_size == 7


def test_the_null_device_returns_zeros_of_every_outputs_shape(extractor):
    from convcache.extract.engine import ExtractorSession

    s = ExtractorSession(str(extractor), "null")
    got = s(np.zeros((3, SIZE, SIZE, 3), np.float32))
    (name, feats), = got.items()
    assert s.provider == "NullExecutionProvider" and feats.shape == (3, *s.contract.feature_shape) and not feats.any()


def test_second_run_performs_zero_inference(extractor, dataset, tmp_path):
    extract(extractor, dataset, tmp_path / "f.zarr", augment=1)
    again = extract(extractor, dataset, tmp_path / "f.zarr", augment=1)
    assert again.inference_calls == 0 and again.rows_written == 0 and again.rows_cached == 2 * 6 * 2 + 8


@pytest.mark.slow
def test_incremental_add_computes_only_new(extractor, dataset, tmp_path):
    extract(extractor, dataset, tmp_path / "f.zarr", augment=1)
    make_image(dataset / "train" / "cats" / "new.jpg", seed=999, kind=0)
    s = extract(extractor, dataset, tmp_path / "f.zarr", augment=1)
    assert s.rows_written == 2 and s.rows_cached == 24 + 8
    # More copies later: only the new copies are computed.
    s = extract(extractor, dataset, tmp_path / "f.zarr", augment=2)
    assert s.rows_written == 13
    extract(extractor, dataset, tmp_path / "clean.zarr", augment=2)
    a, b = FeatureStore(tmp_path / "f.zarr").load("train"), FeatureStore(tmp_path / "clean.zarr").load("train")
    key = lambda d: sorted(zip(d.sha256, d.copy.tolist()))
    assert key(a) == key(b)


def test_different_model_or_policy_is_refused(extractor, pooled_extractor, dataset, tmp_path):
    extract(extractor, dataset, tmp_path / "f.zarr")
    with pytest.raises(ConvcacheError, match="extractor_sha256"):
        extract(pooled_extractor, dataset, tmp_path / "f.zarr")
    with pytest.raises(ConvcacheError, match="policy"):
        extract(extractor, dataset, tmp_path / "f.zarr", policy=AugmentPolicy(rotation_range=10))
    assert FeatureStore(tmp_path / "f.zarr").rows("train") == 12  # nothing was lost


@pytest.mark.slow
def test_resume_after_kill_matches_clean_run(extractor, tmp_path):
    data = make_dataset(tmp_path / "data", splits={"train": 25, "validation": 5})
    args = [sys.executable, "-m", "convcache", "extract", "--model", extractor, "--data", data, "--augment", "3",
            "--batch-size", "1", "--chunk-rows", "2", "--workers", "2", "--no-progress", "-o"]
    killed = tmp_path / "killed.zarr"
    attrs = killed / "train" / "zarr.json"
    proc = subprocess.Popen([*map(str, args), str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if json.loads(attrs.read_text())["attributes"]["committed_rows"] >= 10:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert FeatureStore(killed).rows("train") < 100
    r = subprocess.run([*map(str, args), str(killed)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    clean = tmp_path / "clean.zarr"
    extract(extractor, data, clean, augment=3, batch_size=1, chunk_rows=2)
    assert_same_store(killed, clean)


def _bad_files(root):
    cats = root / "train" / "cats"
    (cats / "empty.jpg").write_bytes(b"")
    (cats / "notes.txt").write_text("not an image")
    good = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 120, np.uint8)).save(good, "JPEG")
    (cats / "truncated.jpg").write_bytes(good.getvalue()[:200])
    (cats / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(500))
    Image.new("L", (3000, 3000)).save(cats / "huge.png")


def test_bad_files_are_skipped_with_reasons(extractor, dataset, tmp_path):
    _bad_files(dataset)
    s = extract(extractor, dataset, tmp_path / "f.zarr", max_pixels=1_000_000)
    reasons = {os.path.basename(p): r for p, r in s.skipped.items()}
    assert reasons["empty.jpg"] == "empty file"
    assert reasons["notes.txt"] == "not an image"
    assert "truncated" in reasons["truncated.jpg"] or "corrupt" in reasons["truncated.jpg"]
    assert "corrupt.jpg" in reasons
    assert "too many pixels" in reasons["huge.png"]
    assert len(reasons) == 5 and s.rows_written == 20
    assert len(FeatureStore(tmp_path / "f.zarr").skipped("train")) == 5
    r = run_cli("extract", "--model", extractor, "--data", dataset, "-o", tmp_path / "g.zarr", "--max-pixels",
                1_000_000, "--no-progress")
    assert r.returncode == 3 and "skipped" in r.stdout and "Traceback" not in r.stderr
    assert "; 20 decoded, in threads" in r.stdout  # the images that decoded, each once; the summary says where


def test_odd_modes_are_converted_not_skipped(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    img = Image.fromarray(rgb)
    cases = {
        "gray.png": img.convert("L"),
        "cmyk.jpg": img.convert("CMYK"),
        "palette.png": img.convert("P"),
        "alpha.png": img.convert("RGBA"),
        "sixteen.png": Image.fromarray(np.asarray(img.convert("L"), np.uint16) * 257),
    }
    for name, im in cases.items():
        buf = io.BytesIO()
        im.save(buf, name.split(".")[1].replace("jpg", "jpeg"))
        out = decode_image(buf.getvalue(), SIZE)
        assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8, name
    # 16-bit is scaled, not clipped: it matches its 8-bit version.
    gray8 = decode_image(_png(img.convert("L")), SIZE).astype(int)
    gray16 = decode_image(_png(cases["sixteen.png"]), SIZE).astype(int)
    assert np.abs(gray8 - gray16).max() <= 1
    # Transparent pixels composite over white.
    clear = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    assert decode_image(_png(clear), SIZE).min() == 255
    # EXIF orientation 6 (rotate 90 CW) is applied.
    tall = Image.fromarray(rgb)  # 60 wide, 40 high
    exif = tall.getexif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    tall.save(buf, "PNG", exif=exif)
    rotated = decode_image(buf.getvalue(), SIZE)
    expected = decode_image(_png(tall.transpose(Image.Transpose.ROTATE_270)), SIZE)
    np.testing.assert_array_equal(rotated, expected)


def _png(im):
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def test_csv_manifest_and_missing_file(extractor, dataset, tmp_path):
    lines = ["path,label,split"]
    for split in ("train", "validation"):
        for f in sorted((dataset / split).rglob("*.jpg")):
            lines.append(f"{f.relative_to(dataset)},{f.parent.name},{split}")
    lines.append("train/cats/missing.jpg,cats,train")
    (dataset / "manifest.csv").write_text("\n".join(lines) + "\n")
    s = extract(extractor, dataset / "manifest.csv", tmp_path / "m.zarr")
    assert s.rows_written == 20 and list(s.skipped.values()) == ["unreadable: No such file or directory"]
    extract(extractor, dataset, tmp_path / "d.zarr")
    a, b = FeatureStore(tmp_path / "m.zarr").load("train"), FeatureStore(tmp_path / "d.zarr").load("train")
    np.testing.assert_array_equal(a.features, b.features)
    np.testing.assert_array_equal(a.labels, b.labels)


def test_multiclass_single_folder(extractor, tmp_path):
    root = make_dataset(tmp_path / "d", classes=("ant", "bee", "cow"), splits={"train": 3})
    s = extract(extractor, root / "train", tmp_path / "f.zarr")
    store = FeatureStore(tmp_path / "f.zarr")
    assert s.rows_written == 9 and store.classes == ["ant", "bee", "cow"]
    assert sorted(store.load("train").labels.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_cli_errors(extractor, dataset, tmp_path):
    r = run_cli("extract", "--model", tmp_path / "none.onnx", "--data", dataset, "-o", tmp_path / "f.zarr")
    assert r.returncode == 2 and "model not found" in r.stderr
    r = run_cli("extract", "--model", extractor, "--data", tmp_path / "nodata", "-o", tmp_path / "f.zarr")
    assert r.returncode == 2 and "no such file" in r.stderr
    r = run_cli("extract", "--model", extractor, "--data", dataset, "-o", tmp_path / "f.zarr", "--device", "cuda")
    assert r.returncode == 2 and "cuda" in r.stderr.lower() and "Traceback" not in r.stderr


def test_dask_view_matches_numpy(extractor, dataset, tmp_path):
    extract(extractor, dataset, tmp_path / "f.zarr", augment=1)
    store = FeatureStore(tmp_path / "f.zarr")
    lazy = store.dask("train")
    eager = store.load("train")
    np.testing.assert_array_equal(lazy["features"].compute(), eager.features)
    np.testing.assert_array_equal(lazy["copy"].compute(), eager.copy)


def test_info_describes_a_store_and_its_integrity(extractor, tmp_path):
    import json

    data = make_dataset(tmp_path / "d", splits={"train": 3, "validation": 2})
    (data / "train" / "cats" / "broken.jpg").write_bytes(b"not a jpeg")
    store = tmp_path / "f.zarr"
    run_extract(ExtractConfig(model=str(extractor), data=str(data), output=str(store), augment=2, progress=False))
    model = run_cli("info", extractor).stdout
    assert "unk__" not in model and "features float32 [None, 1, 1, 512]" in model  # sizes, not converter names
    r = run_cli("info", store, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    train = info["splits"]["train"]
    assert info["classes"] == ["cats", "dogs"] and train["rows"] == 6 * 3 and train["copies"] == 2
    assert train["integrity"] == "intact" and train["extractor"]["layer"] == "block5_pool"
    assert train["augment"]["seed"] == 0 and any("broken.jpg" in f for f in train["skipped"])
    text = run_cli("info", store).stdout
    assert "train: 18 rows, copies 0..2" in text and "skipped" in text and "broken.jpg" in text
    chunk = next(p for p in (store / "train" / "features" / "c").rglob("*") if p.is_file())
    chunk.write_bytes(chunk.read_bytes()[:-8] + bytes(8))  # a damaged chunk: info says so and exits 1
    r = run_cli("info", store)
    assert r.returncode == 1 and "integrity: rows" in r.stdout


def test_both_executors_implement_the_executor_protocol():
    """The engine calls an executor only through `engine.Executor`: local threads and Dask alike."""
    from convcache.extract.distributed import DaskExecutor
    from convcache.extract.engine import Executor, LocalExecutor

    members = [n for n in vars(Executor) if not n.startswith("_")]
    members += list(Executor.__annotations__)
    assert {"run", "usable", "hash_files", "reserve", "block_rows", "provider"} <= set(members)
    for cls in (LocalExecutor, DaskExecutor):
        missing = [n for n in members if n != "provider" and not callable(getattr(cls, n, None))]
        assert not missing, f"{cls.__name__} lacks {missing}"
