"""Hostile input: no single file or manifest row takes down a run, and bad input is one line, not a traceback."""

import io
import json
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import SIZE, make_dataset, make_image, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from convcache.errors import ConvcacheError, ImageError
from convcache.extract.runner import ExtractConfig, run_extract
from convcache.imaging import decode_image
from convcache.store import FeatureStore


def _seeds() -> list[bytes]:
    rng = np.random.default_rng(0)
    pic = Image.fromarray(rng.integers(0, 255, (24, 20, 3), dtype=np.uint8))
    out = []
    for fmt, kw in (("JPEG", {}), ("PNG", {}), ("GIF", {}), ("BMP", {}), ("TIFF", {}), ("WEBP", {}),
                    ("PNG", {"bits": 16})):
        buf = io.BytesIO()
        img = pic.convert("I;16") if kw.get("bits") == 16 else pic
        img.save(buf, fmt)
        out.append(buf.getvalue())
    return out


def _dds_unknown_flags() -> bytes:
    hdr = bytearray(124)
    struct.pack_into("<IIIIIII", hdr, 0, 124, 0x1007, 8, 8, 0, 0, 0)
    struct.pack_into("<II", hdr, 72, 32, 0)  # pixel format flags 0: Pillow raises NotImplementedError
    return b"DDS " + bytes(hdr) + bytes(256)


SEEDS = _seeds() + [_dds_unknown_flags()]


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(st.sampled_from(range(len(SEEDS))), st.lists(st.tuples(st.integers(0, 4096), st.integers(0, 255)),
                                                    max_size=12), st.integers(0, 4096))
def test_fuzzed_images_raise_only_image_error(which, flips, cut):
    """Mutated real images (byte flips, truncation): decoding returns pixels or raises ImageError, nothing else."""
    data = bytearray(SEEDS[which])
    for pos, val in flips:
        if data:
            data[pos % len(data)] = val
    data = bytes(data[: max(1, len(data) - cut % max(1, len(data)))])
    try:
        px = decode_image(data, 32)
        assert px.shape == (32, 32, 3) and px.dtype == np.uint8
    except ImageError:
        pass


@pytest.mark.slow
def test_malformed_dds_is_a_skip_not_a_crash(extractor, tmp_path):
    data = make_dataset(tmp_path / "d", splits={"train": 2})
    (data / "train" / "cats" / "odd.dds").write_bytes(_dds_unknown_flags())
    s = run_extract(ExtractConfig(model=str(extractor), data=str(data), output=str(tmp_path / "f.zarr"),
                                  progress=False))
    assert s.rows_written == 4 and "NotImplementedError" in next(iter(s.skipped.values()))


@pytest.mark.skipif(sys.platform != "linux", reason="needs a filesystem that takes arbitrary bytes in names")
def test_odd_entries_are_reported_and_bad_names_kept(extractor, tmp_path):
    data = make_dataset(tmp_path / "d", splits={"train": 2})
    cats = data / "train" / "cats"
    bad_name = os.fsencode(str(cats)) + b"/caf\xe9.jpg"  # Latin-1 bytes: not valid UTF-8
    make_image(tmp_path / "x.jpg", seed=77, kind=0)
    with open(bad_name, "wb") as f:
        f.write((tmp_path / "x.jpg").read_bytes())
    os.mkfifo(cats / "pipe.jpg")  # would hang a plain open()
    (cats / "folder.jpg").mkdir()
    os.symlink(cats / "loop.jpg", cats / "loop.jpg")
    (cats / "big.jpg").write_bytes(b"\xff" * 5000)
    r = run_cli("extract", "--model", extractor, "--data", data, "-o", tmp_path / "f.zarr", "--max-bytes", 4000,
                "--quiet", timeout=120)
    assert r.returncode == 3 and "Traceback" not in r.stderr, r.stderr
    out = r.stdout
    assert "pipe.jpg: not a regular file" in out and "folder.jpg: a directory" in out
    assert "loop.jpg: unreadable" in out and "big.jpg: file too large" in out
    paths = FeatureStore(tmp_path / "f.zarr").load("train").paths
    assert any(p.endswith("caf\\xe9.jpg") for p in paths)  # stored, with its raw byte kept as an escape


def test_duplicate_content_with_conflicting_labels_is_skipped(extractor, tmp_path):
    data = make_dataset(tmp_path / "d", splits={"train": 2})
    (data / "train" / "dogs" / "copy.jpg").write_bytes((data / "train" / "cats" / "cats.0.jpg").read_bytes())
    (data / "train" / "cats" / "same.jpg").write_bytes((data / "train" / "cats" / "cats.1.jpg").read_bytes())
    s = run_extract(ExtractConfig(model=str(extractor), data=str(data), output=str(tmp_path / "f.zarr"),
                                  progress=False))
    conflict = {os.path.basename(p) for p, r in s.skipped.items() if "different labels" in r}
    assert conflict == {"copy.jpg", "cats.0.jpg"} and len(s.duplicates) == 1 and s.rows_written == 3


def test_a_16_bit_decode_bomb_stays_bounded(tmp_path):
    """A 6300x6300 16-bit PNG (~77 KB on disk) decodes within a stated peak RSS."""
    path = tmp_path / "bomb.png"
    Image.new("I;16", (6300, 6300), 1000).save(path)
    assert path.stat().st_size < 200_000
    code = ("import resource, sys; from convcache.imaging import read_and_decode; "
            f"px = read_and_decode({str(path)!r}, 150)[1]; assert px.shape == (150, 150, 3); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    baseline = ("import resource; import convcache.imaging, numpy, PIL.Image; "
                "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    peak = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    base = int(subprocess.run([sys.executable, "-c", baseline], capture_output=True, text=True, check=True).stdout)
    assert (peak - base) / 1024 < 300, f"decoding took {(peak - base) / 1024:.0f} MiB above the interpreter"
    with pytest.raises(ImageError, match="decoding needs"):
        decode_image(path.read_bytes(), 150, max_decode_bytes=32 << 20)



def test_reading_a_file_allocates_its_size_and_still_sees_it_grow(tmp_path, monkeypatch):
    """read_bytes asks for what stat said (plus a byte), not for its 64 MiB ceiling: an allocation of the
    ceiling cost ~45 µs a photo (hashing and decoding each read every file). A file that grew after stat is
    read on, and refused once past the ceiling."""
    import tracemalloc

    import convcache.imaging as imaging

    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 1000)
    tracemalloc.start()
    assert imaging.read_bytes(str(path), 64 << 20) == b"x" * 1000
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1 << 20, f"reading 1 KB allocated {peak} bytes"
    real = os.stat

    class Shrunk:  # what stat said before the file grew to its 1000 bytes
        def __init__(self, p):
            self._st = real(p)
            self.st_mode, self.st_size = self._st.st_mode, 10

    monkeypatch.setattr(imaging.os, "stat", Shrunk)
    assert imaging.read_bytes(str(path), 64 << 20) == b"x" * 1000
    with pytest.raises(ImageError, match="file too large: over 500 bytes"):
        imaging.read_bytes(str(path), 500)

@pytest.mark.parametrize("content, message", [
    (b"\xef\xbb\xbfpath,label\n{img},cats\n", None),  # a BOM is fine
    (b"path,label\n{img}\n", ":2: expected 2 fields"),
    (b"path,label\n{img},\n", ":2: empty label"),
    (b"path,label\n{img},caf\xe9\n", ":2: not UTF-8"),
    (b"path,label\n{img},cats\n{img}," + b"x" * 200_000 + b"\n", ":3:"),
])
def test_manifest_rows_fail_with_their_line(extractor, tmp_path, content, message):
    make_image(tmp_path / "a.jpg", seed=1, kind=0)
    make_image(tmp_path / "b.jpg", seed=2, kind=1)
    (tmp_path / "m.csv").write_bytes(content.replace(b"{img}", b"a.jpg") + b"b.jpg,dogs\n")
    r = run_cli("extract", "--model", extractor, "--data", tmp_path / "m.csv", "-o", tmp_path / "f.zarr", "--quiet")
    if message is None:
        assert r.returncode == 0, r.stderr
        assert FeatureStore(tmp_path / "f.zarr").classes == ["cats", "dogs"]
    else:
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


def test_negative_seed_is_one_line(extractor, tmp_path):
    data = make_dataset(tmp_path / "d", splits={"train": 1})
    r = run_cli("extract", "--model", extractor, "--data", data, "-o", tmp_path / "f.zarr", "--seed", "-1")
    assert r.returncode == 2 and "--seed" in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(ConvcacheError):
        ExtractConfig(model="m", data="d", output="o", policy='{"zoom_range": 1.5}')


@pytest.mark.slow
def test_predict_reports_every_bad_file_and_goes_on(fused_model, tmp_path):
    good = tmp_path / "good.jpg"
    make_image(good, seed=3, kind=0)
    (tmp_path / "odd.dds").write_bytes(_dds_unknown_flags())
    os.mkfifo(tmp_path / "pipe.jpg")
    r = run_cli("predict", "--model", fused_model, tmp_path / "odd.dds", tmp_path / "pipe.jpg", good, timeout=60)
    lines = r.stdout.strip().splitlines()
    assert r.returncode == 3 and len(lines) == 3 and '"class"' in lines[2] and "Traceback" not in r.stderr
    assert "NotImplementedError" in lines[0] and "not a regular file" in lines[1]


@pytest.mark.slow
def test_a_second_writer_fails_at_once_and_nothing_is_lost(extractor, tmp_path):
    import json
    import time

    data = make_dataset(tmp_path / "d", splits={"train": 12, "validation": 2})
    store = tmp_path / "f.zarr"
    args = [sys.executable, "-m", "convcache", "extract", "--model", str(extractor), "--data", str(data), "--augment",
            "2", "--batch-size", "1", "--chunk-rows", "2", "--quiet", "-o", str(store)]
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until the first writer has committed something
        try:
            if json.loads((store / "train" / "zarr.json").read_text())["attributes"]["committed_rows"] >= 2:
                break
        except (OSError, ValueError, KeyError):
            time.sleep(0.01)
    # held mid-run (SIGSTOP: its lock held, as a slow writer's is) while the second starts, however fast the first
    # would otherwise finish (a second interpreter takes longer to start than the rest of this small run)
    first.send_signal(signal.SIGSTOP)
    try:
        assert first.poll() is None, "the first writer finished before the second started"
        second = subprocess.run(args, capture_output=True, text=True)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2 and "another extract is writing" in second.stderr
    assert "Traceback" not in second.stderr
    assert first.wait(120) == 0
    clean = tmp_path / "clean.zarr"
    run_extract(ExtractConfig(model=str(extractor), data=str(data), output=str(clean), augment=2, progress=False))
    a, b = FeatureStore(store).load("train"), FeatureStore(clean).load("train")
    key = lambda d: sorted(zip(d.sha256, d.copy.tolist()))
    assert key(a) == key(b) and len(a) == 12 * 2 * 3


def _chunk_files(store, split, name):
    return sorted(p for p in (store / split / name / "c").rglob("*") if p.is_file())


@pytest.mark.slow
def test_damage_is_named_never_silent_and_repair_recomputes(extractor, tmp_path):
    import json
    import shutil

    data = make_dataset(tmp_path / "d", splits={"train": 6, "validation": 2})
    clean = tmp_path / "clean.zarr"
    run_extract(ExtractConfig(model=str(extractor), data=str(data), output=str(clean), augment=1, chunk_rows=4,
                              progress=False))
    assert run_cli("extract", "--verify", "-o", clean).returncode == 0

    def damaged_copy(tag, damage):
        store = tmp_path / f"{tag}.zarr"
        shutil.copytree(clean, store)
        damage(store)
        return store

    def drop_feature_chunk(store):
        _chunk_files(store, "train", "features")[1].unlink()

    def drop_sha_chunk(store):
        _chunk_files(store, "train", "sha256")[0].unlink()

    def raise_committed(store):
        meta = json.loads((store / "train" / "zarr.json").read_text())
        meta["attributes"]["committed_rows"] += 8
        (store / "train" / "zarr.json").write_text(json.dumps(meta))
        (store / "zarr.json").write_text(json.dumps({k: v for k, v in json.loads(
            (store / "zarr.json").read_text()).items() if k != "consolidated_metadata"}))

    def corrupt_chunk(store):
        f = _chunk_files(store, "train", "features")[0]
        f.write_bytes(f.read_bytes()[:10] + b"garbage")

    for tag, damage, words in (("chunk", drop_feature_chunk, "differ from the block digest"),
                               ("sha", drop_sha_chunk, "differ from the block digest"),
                               ("counter", raise_committed, "hold fewer rows"),
                               ("corrupt", corrupt_chunk, "unreadable chunk")):
        store = damaged_copy(tag, damage)
        r = run_cli("extract", "--verify", "-o", store)
        assert r.returncode == 2 and words in r.stdout and "rows " in r.stdout, (tag, r.stdout, r.stderr)
        r = run_cli("train", "--features", store, "--head", "logreg", "-o", tmp_path / f"h-{tag}")
        assert r.returncode == 2 and "damaged" in r.stderr and "Traceback" not in r.stderr, (tag, r.stderr)
        rows = FeatureStore(store).rows("train")
        r = run_cli("extract", "--model", extractor, "--data", data, "--augment", 1, "--chunk-rows", 4, "-o", store,
                    "--quiet")
        if tag in ("sha", "counter"):  # what a writer reads to decide what is missing: refused
            assert r.returncode == 2 and "--repair" in r.stderr, (tag, r.stderr)
        else:  # feature chunks a writer never reads (its check is O(small columns)): nothing is appended,
            assert r.returncode == 0 and "extracted 0 rows" in r.stdout, (tag, r.stdout)  # and --verify still
            assert FeatureStore(store).rows("train") == rows  # reports the damage
            assert run_cli("extract", "--verify", "-o", store).returncode == 2
        r = run_cli("extract", "--model", extractor, "--data", data, "--augment", 1, "--chunk-rows", 4, "-o", store,
                    "--quiet", "--repair")
        assert r.returncode == 0, (tag, r.stderr)
        assert run_cli("extract", "--verify", "-o", store).returncode == 0
        a, b = FeatureStore(store).load("train"), FeatureStore(clean).load("train")
        key = lambda d: sorted(zip(d.sha256, d.copy.tolist()))
        assert key(a) == key(b) and len(a) == len(b), tag


@pytest.mark.slow
def test_corrupt_store_metadata_is_one_line(extractor, tmp_path):
    data = make_dataset(tmp_path / "d", splits={"train": 2, "validation": 1})
    store = tmp_path / "f.zarr"
    run_extract(ExtractConfig(model=str(extractor), data=str(data), output=str(store), progress=False))
    (store / "zarr.json").write_text("{ not json")
    for args in (("train", "--features", store, "-o", tmp_path / "h"),
                 ("extract", "--model", extractor, "--data", data, "-o", store, "--quiet")):
        r = run_cli(*args)
        assert r.returncode == 2 and "unreadable store metadata" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_store_from_before_block_digests_is_extended(extractor, tmp_path):
    import shutil

    import zarr

    data = make_dataset(tmp_path / "d", splits={"train": 3, "validation": 1})
    store = tmp_path / "f.zarr"
    run_extract(ExtractConfig(model=str(extractor), data=str(data), output=str(store), progress=False))
    for split in ("train", "validation"):  # make it look like a store written before digests existed
        for name in ("block_start", "block_sha256", "block_keys_sha256"):
            shutil.rmtree(store / split / "bookkeeping" / name)
        group = zarr.open_group(str(store / split), mode="a", use_consolidated=False)
        group.attrs.pop("seal")  # (seals came after digests)
    zarr.consolidate_metadata(str(store))
    s = run_extract(ExtractConfig(model=str(extractor), data=str(data), output=str(store), augment=1,
                                  progress=False))
    assert s.rows_written == 6
    damage, note = FeatureStore(store).verify("train")
    assert damage == [] and note is None and len(FeatureStore(store).load("train")) == 12


@pytest.mark.slow
def test_disk_full_is_one_line_and_keeps_what_was_committed(extractor, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(small)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root in a mount namespace)")
    try:
        data = make_dataset(tmp_path / "d", splits={"train": 40, "validation": 4})
        r = run_cli("extract", "--model", extractor, "--data", data, "--augment", 3, "--chunk-rows", 4,
                    "-o", small / "f.zarr", "--quiet")
        assert r.returncode == 2 and "No space left on device" in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        store = FeatureStore(small / "f.zarr")
        assert store.rows("train") > 0 and store.verify("train")[0] == []  # what was committed is intact
        assert len(store.load("train")) == store.rows("train")
    finally:
        subprocess.run(["umount", str(small)], capture_output=True)


def test_a_split_created_only_in_part_is_created_again(extractor, tmp_path):
    """A kill between creating a split's group and its arrays (found by the kill -9 stress run)."""
    import shutil

    data = make_dataset(tmp_path / "d", splits={"train": 2, "validation": 2})
    store = tmp_path / "f.zarr"
    run_extract(ExtractConfig(model=str(extractor), data=str(data), output=str(store), progress=False))
    clean = tmp_path / "clean.zarr"
    shutil.copytree(store, clean)
    meta = store / "validation" / "zarr.json"
    import json

    m = json.loads(meta.read_text())
    m["attributes"]["committed_rows"] = 0
    meta.write_text(json.dumps(m))
    for name in ("label", "image", "copy", "sha256", "path", "bookkeeping"):
        shutil.rmtree(store / "validation" / name)
    s = run_extract(ExtractConfig(model=str(extractor), data=str(data), output=str(store), progress=False))
    assert s.rows_written == 4 and FeatureStore(store).verify("validation")[0] == []
    np.testing.assert_array_equal(FeatureStore(store).load("validation").features,
                                  FeatureStore(clean).load("validation").features)


@pytest.mark.parametrize("content", [b"[]", b'"x"', b'{"expires": "soon"}', b"null"])
def test_a_malformed_lease_is_taken_over_not_a_traceback(content):
    """A lease object that is not a lease record (a list, a string, a non-numeric expiry, JSON null) is
    treated as expired and taken over in one warning, never a traceback or a store stuck as contended."""
    import fsspec

    from convcache.store.lease import writer_lock

    url = f"memory://lease-{abs(hash(content))}/f.zarr"
    fsspec.filesystem("memory").pipe_file(url.removeprefix("memory://") + ".lock", content)
    with writer_lock(url) as guard:
        guard()  # held: the lease is ours


def test_taking_the_fencing_token_keeps_the_snapshot_for_its_readers(extractor, tmp_path):
    """A writer on object storage records its fencing token in the root's metadata when it starts. Written
    through the writer's handle (opened without the snapshot), that dropped the consolidated snapshot until the
    run's first consolidation: readers of the snapshot found none. The token goes in beside the snapshot."""
    import fsspec

    from convcache.store.lease import writer_lock
    from convcache.store.writer import open_root

    url = "memory://fence-snapshot/s.zarr"
    data = make_dataset(tmp_path / "d", splits={"train": 2})
    run_extract(ExtractConfig(model=str(extractor), data=str(data), output=url, progress=False))
    with writer_lock(url) as guard:
        guard.fence(open_root(url, ["cats", "dogs"]))
        doc = json.loads(fsspec.filesystem("memory").cat_file("/fence-snapshot/s.zarr/zarr.json"))
        assert doc["attributes"]["writer_fence"] == 2 and "train" in doc["consolidated_metadata"]["metadata"]
        assert FeatureStore(url).rows("train") == 4


@pytest.mark.parametrize("edit, message", [
    (("root", "classes", "cats"), "classes attribute is 'cats'"),
    (("root", "classes", ["cats", "cats", "cats"]), "not a list of at least 2 distinct names"),
    (("root", "classes", ["cats"]), "not a list of at least 2 distinct names"),
    (("train", "committed_rows", -5), "committed_rows is -5, not a row count"),
    (("train", "committed_rows", "lots"), "committed_rows is 'lots', not a row count"),
    (("train", "extractor", None), "does not record its extractor"),
])
def test_malformed_store_attributes_are_one_line_errors(extractor, tmp_path, edit, message):
    import zarr

    data = make_dataset(tmp_path / "d", splits={"train": 3, "validation": 2})
    store = tmp_path / "f.zarr"
    run_extract(ExtractConfig(model=str(extractor), data=str(data), output=str(store), progress=False))
    where, key, value = edit
    group = zarr.open_group(str(store), mode="a", use_consolidated=False)
    target = group if where == "root" else group[where]
    if value is None:
        attrs = dict(target.attrs)
        attrs.pop(key)
        target.attrs.clear()
        target.attrs.update(attrs)
    else:
        target.attrs[key] = value
    zarr.consolidate_metadata(str(store))
    for args in (("train", "--features", store, "--head", "logreg", "-o", tmp_path / "h"),
                 ("extract", "--model", extractor, "--data", data, "-o", store, "-q")):
        r = run_cli(*args)
        if args[0] == "extract" and key == "extractor":  # extract reads the split's identity, not its provenance
            continue
        assert r.returncode != 0 and "Traceback" not in r.stderr, (args[0], r.stderr[-400:])
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0] or args[0] == "extract", (args[0], r.stderr)
        assert str(store) in r.stderr and "FeatureStore object" not in r.stderr


def test_an_impossible_memory_budget_is_one_line(tmp_path):
    r = run_cli("train", "--features", tmp_path / "none.zarr", "--memory-budget", "1e400GB", "-o", tmp_path / "h")
    assert r.returncode == 2 and "--memory-budget 1e400GB: expected a size" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("edit", ["classes", "data_type", "committed_rows", "identity"])
def test_what_gives_rows_their_meaning_is_sealed(extractor, tmp_path, edit):
    """Edits that keep every block digest valid (issue 19, item 5): the root's classes swapped, the
    features' data_type changed in the array metadata (same bytes), committed_rows lowered to a block
    boundary, the split's recorded identity edited. --verify, train and extract all refuse the store."""
    import zarr

    data = make_dataset(tmp_path / "d", splits={"train": 4, "validation": 2})
    store = tmp_path / "f.zarr"
    run_extract(ExtractConfig(model=str(extractor), data=str(data), output=str(store), augment=1, chunk_rows=4,
                              progress=False))
    root = zarr.open_group(str(store), mode="a", use_consolidated=False)
    if edit == "classes":
        root.attrs["classes"] = ["dogs", "cats"]
    elif edit == "committed_rows":
        root["train"].attrs["committed_rows"] = 8  # a block boundary: every remaining block digest is valid
    elif edit == "identity":
        root["train"].attrs["identity"] = {**root["train"].attrs["identity"], "seed": 7}
    else:
        meta = store / "train" / "features" / "zarr.json"
        meta.write_text(meta.read_text().replace('"float32"', '"int32"'))
    zarr.consolidate_metadata(str(store))
    r = run_cli("extract", "--verify", "-o", store)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stdout + r.stderr
    r = run_cli("train", "--features", store, "--head", "logreg", "-o", tmp_path / "h")
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = run_cli("extract", "--model", extractor, "--data", data, "--augment", 1, "-o", store, "-q")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr


def test_a_split_without_its_own_metadata_is_reported_and_repaired(extractor, tmp_path):
    """Issue 19 item 6: a deleted train/zarr.json (its arrays still there, the consolidated snapshot still
    naming it) is damage for --verify, a one-line refusal for extract (not ContainsArrayError), and
    --repair rebuilds the split; arrays shrunk behind the snapshot's back are found from their own metadata."""
    import zarr

    data = make_dataset(tmp_path / "d", splits={"train": 3, "validation": 1})
    store = tmp_path / "f.zarr"
    cmd = ("extract", "--model", extractor, "--data", data, "-o", store, "--chunk-rows", 2, "--quiet")
    assert run_cli(*cmd).returncode == 0
    (store / "train" / "zarr.json").unlink()
    r = run_cli("extract", "--verify", "-o", store)
    assert r.returncode == 2 and "train/zarr.json" in r.stdout, r.stdout
    r = run_cli(*cmd)
    assert r.returncode == 2 and "train/zarr.json" in r.stderr and "--repair" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert run_cli(*cmd, "--repair").returncode == 0
    assert run_cli("extract", "--verify", "-o", store).returncode == 0 and FeatureStore(store).rows("train") == 6

    arr = zarr.open_array(str(store), path="train/features", mode="r+", use_consolidated=False)
    arr.resize((4, *arr.shape[1:]))  # what a writer that lost its lease did: the snapshot still says 6
    r = run_cli("extract", "--verify", "-o", store)
    assert r.returncode == 2 and "hold fewer rows" in r.stdout, r.stdout


def _liar(fused_model, path):
    """The fused model plus an initializer that declares 64 GiB and holds 4 KB."""
    import onnx
    from onnx import TensorProto

    m = onnx.load(str(fused_model))
    t = TensorProto(name="huge", dims=[1 << 34], data_type=TensorProto.FLOAT, raw_data=b"\0" * 4096)
    m.graph.initializer.append(t)
    onnx.save(m, str(path))
    return path


@pytest.mark.slow
def test_round_four_invocations_are_one_line_and_non_zero(fused_model, extractor, tmp_path):
    """Issue 30, section 4: each gave a traceback, or started a server that refused every upload."""
    (tmp_path / "file").write_text("a regular file")
    under = tmp_path / "file" / "out"
    photo = tmp_path / "p.jpg"
    make_image(photo, seed=1)
    one = tmp_path / "one"
    for i in range(3):
        make_image(one / "train" / "cats" / f"{i}.jpg", seed=i)
    data = make_dataset(tmp_path / "data", splits={"train": 2})
    store = tmp_path / "s.zarr"
    assert run_cli("extract", "--model", extractor, "--data", data, "-o", store, "-q").returncode == 0
    liar = _liar(fused_model, tmp_path / "liar.onnx")
    cases = [
        (["serve", "--model", fused_model, "--port", 99999], "--port 99999"),
        (["serve", "--model", fused_model, "--max-body-mb", -1], "--max-body-mb"),
        (["serve", "--model", fused_model, "--max-batch", 0], "--max-batch 0"),
        (["serve", "--model", fused_model, "--cache-mb", -1], "--cache-mb -1"),
        (["serve", "--model", fused_model, "--workers", 0], "--workers 0"),
        (["predict", "--model", fused_model, "--batch-size", 0, photo], "batch size 0"),
        (["predict", "--model", fused_model, "--workers", 0, photo], "--workers 0"),
        (["predict", "--model", fused_model, "--decode-memory", "lots", photo], "--decode-memory"),
        (["train", "--features", store, "-o", under, "-q"], "Not a directory"),
        (["triton", "--model", fused_model, "-o", under], "Not a directory"),
        (["fit", "--data", data, "-o", under, "-q", "--weights", "random", "--input-size", SIZE], "Not a directory"),
        (["predict", "--model", liar, photo], "declares dims"),
        (["info", liar], "declares dims"),
        (["extract", "--model", extractor, "--data", one, "-o", tmp_path / "one.zarr", "-q"], "1 class folder"),
    ]
    for args, words in cases:
        r = run_cli(*args, timeout=120)
        lines = [x for x in r.stderr.splitlines() if x.strip() and not x.startswith(("WARNING", "INFO"))]
        assert r.returncode not in (0, 1) and "Traceback" not in r.stderr, (args, r.stderr[-800:])
        assert len(lines) == 1 and words in lines[0], (args, lines)


def test_cli_habits_quiet_everywhere_tqdm_disable_and_predict_inputs(fused_model, extractor, tmp_path):
    """Issue 31, item 9: -q on every command; TQDM_DISABLE=1 silences progress as -q does; `predict` takes a
    folder, paths on standard input (-) and --format csv."""
    import csv

    from convcache.cli import build_parser

    stages = build_parser()._subparsers._group_actions[0].choices
    assert all("-q" in p._option_string_actions for p in stages.values()), \
        [n for n, p in stages.items() if "-q" not in p._option_string_actions]
    data = make_dataset(tmp_path / "d", splits={"train": 4, "validation": 2})
    loud = run_cli("extract", "--model", extractor, "--data", data, "-o", tmp_path / "a.zarr",
                   env={"TQDM_DISABLE": ""})
    quiet = run_cli("extract", "--model", extractor, "--data", data, "-o", tmp_path / "b.zarr",
                    env={"TQDM_DISABLE": "1"})
    assert loud.returncode == quiet.returncode == 0, (loud.stderr, quiet.stderr)
    assert "row/s" in loud.stderr and "row/s" not in quiet.stderr and "%|" not in quiet.stderr, quiet.stderr
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    make_image(folder / "a.jpg", 1)
    make_image(folder / "sub" / "b.jpg", 2)
    (folder / ".hidden.jpg").write_bytes(b"skipped")
    (folder / "sub" / "bad.jpg").write_bytes(b"not an image")
    r = run_cli("predict", "--model", fused_model, folder, "--format", "csv")
    rows = list(csv.reader(io.StringIO(r.stdout)))
    assert r.returncode == 3 and rows[0][:2] == ["image", "class"] and rows[0][-1] == "error", r.stdout
    assert [Path(x[0]).name for x in rows[1:]] == ["a.jpg", "b.jpg", "bad.jpg"] and rows[3][-1], rows
    assert abs(sum(float(v) for v in rows[1][2:-1]) - 1) < 1e-5
    piped = subprocess.run([sys.executable, "-m", "convcache", "predict", "--model", str(fused_model), "-"],
                           input=f"{folder / 'a.jpg'}\n\n{folder / 'sub' / 'b.jpg'}\n", capture_output=True, text=True)
    lines = [json.loads(x) for x in piped.stdout.splitlines()]
    assert piped.returncode == 0 and [Path(x["image"]).name for x in lines] == ["a.jpg", "b.jpg"], piped.stderr
