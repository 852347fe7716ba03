"""Past one machine: stores and images on object storage (a real S3 endpoint on loopback), extraction
on a real Dask LocalCluster (2 worker processes), kills of a worker and of the client."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import make_dataset, run_cli, wait_for

pytestmark = pytest.mark.dask

pytest.importorskip("distributed")
pytest.importorskip("s3fs")


def _rows(store, split):
    from convcache.store import FeatureStore

    d = FeatureStore(store).load(split)
    return {(s, int(c)): (f, int(i), int(y), p) for s, c, f, i, y, p in zip(d.sha256, d.copy, d.features, d.image,
                                                                             d.labels, d.paths)}


def assert_same_rows(a, b, splits=("train", "validation"), paths=True):
    """Same (sha256, copy) keys, bitwise-equal features, same image index and label (and path)."""
    for split in splits:
        ra, rb = _rows(a, split), _rows(b, split)
        assert ra.keys() == rb.keys(), split
        for k in ra:
            assert np.array_equal(ra[k][0], rb[k][0]), (split, k)
            assert ra[k][1:3] == rb[k][1:3], (split, k)
            if paths:
                assert ra[k][3] == rb[k][3]


def _committed(store: Path, split="train") -> int:
    try:
        return json.loads((store / split / "zarr.json").read_text())["attributes"]["committed_rows"]
    except (OSError, ValueError, KeyError):
        return 0


def _hostile_dataset(root: Path) -> Path:
    data = make_dataset(root, splits={"train": 8, "validation": 3})
    (data / "train" / "cats" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (data / "train" / "dogs" / "copy.jpg").write_bytes((data / "train" / "dogs" / "dogs.0.jpg").read_bytes())
    return data


def test_distributed_equals_single_process(extractor, dask_cluster, tmp_path):
    from convcache.extract.runner import ExtractConfig, run_extract

    data = _hostile_dataset(tmp_path / "data")
    common = dict(model=str(extractor), data=str(data), augment=2, chunk_rows=4, progress=False)
    one = run_extract(ExtractConfig(output=str(tmp_path / "one.zarr"), **common))
    dist = run_extract(ExtractConfig(output=str(tmp_path / "dist.zarr"), scheduler=dask_cluster.scheduler_address,
                                     **common))
    assert dist.rows_written == one.rows_written == (16 * 3 + 6)
    assert dist.skipped == one.skipped and any("broken.jpg" in p for p in dist.skipped)
    assert dist.duplicates == one.duplicates and len(dist.duplicates) == 1
    assert_same_rows(tmp_path / "one.zarr", tmp_path / "dist.zarr")
    from convcache.store import FeatureStore

    store = FeatureStore(tmp_path / "dist.zarr")
    run = store.runs("train")[-1]
    assert run["tasks"] >= 10 and run["workers"] == 2 and run["scheduler"] == dask_cluster.scheduler_address
    assert store.verify("train") == ([], None)
    # a second run computes nothing
    again = run_extract(ExtractConfig(output=str(tmp_path / "dist.zarr"), scheduler=dask_cluster.scheduler_address,
                                      **common))
    assert again.rows_written == 0 and again.rows_cached == one.rows_written


def test_worker_killed_mid_run_completes(extractor, tmp_path):
    """SIGKILL one of two workers while tasks run: the scheduler reruns its tasks, the store is complete."""
    import logging

    from distributed import Client, LocalCluster

    from convcache.extract.runner import ExtractConfig, run_extract

    data = make_dataset(tmp_path / "data", splits={"train": 30})
    common = dict(model=str(extractor), data=str(data), augment=3, chunk_rows=2, progress=False)
    run_extract(ExtractConfig(output=str(tmp_path / "one.zarr"), **common))
    out = tmp_path / "dist.zarr"
    killed = {}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                      silence_logs=logging.CRITICAL) as cluster:
        with Client(cluster) as client:  # one client at a time in this process
            pids = list(client.run(os.getpid).values())

        def killer():
            deadline = time.time() + 60
            while time.time() < deadline and not killed:
                n = _committed(out)
                if n > 0:
                    os.kill(pids[0], signal.SIGKILL)
                    killed["at"] = n
                time.sleep(0.005)

        t = threading.Thread(target=killer)
        t.start()
        summary = run_extract(ExtractConfig(output=str(out), scheduler=cluster.scheduler_address, **common))
        t.join()
    total = 60 * 4
    assert 0 < killed["at"] < total, "the worker was not killed while the run was in flight"
    assert summary.rows_written == total
    assert_same_rows(tmp_path / "one.zarr", out, splits=("train",))


def test_client_killed_then_resumed(extractor, tmp_path):
    """kill -9 the client (and its LocalCluster) mid-run; a re-run computes only the missing rows."""
    data = make_dataset(tmp_path / "data", splits={"train": 30})
    out = tmp_path / "dist.zarr"
    args = [sys.executable, "-m", "convcache", "extract", "--model", extractor, "--data", data, "-o", out,
            "--augment", "3", "--chunk-rows", "2", "--cluster", "local:2", "-q"]
    proc = subprocess.Popen(list(map(str, args)), start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    try:
        while time.time() < deadline and _committed(out) == 0 and proc.poll() is None:
            time.sleep(0.005)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    at_kill = _committed(out)
    total = 60 * 4
    assert 0 < at_kill < total
    r = run_cli("extract", "--model", extractor, "--data", data, "-o", out, "--augment", 3, "--chunk-rows", 2,
                "--cluster", "local:2", "-q")
    assert r.returncode == 0, r.stderr
    written = int(r.stdout.split("extracted ")[1].split(" rows")[0])
    assert written == total - at_kill  # read after the kill: exactly what the re-run found committed
    from convcache.extract.runner import ExtractConfig, run_extract

    run_extract(ExtractConfig(model=str(extractor), data=str(data), output=str(tmp_path / "one.zarr"), augment=3,
                              chunk_rows=2, progress=False))
    assert_same_rows(tmp_path / "one.zarr", out, splits=("train",))


def _upload(local: Path, url_path: str) -> None:
    import s3fs

    s3fs.S3FileSystem().put(str(local), url_path, recursive=True)


@pytest.mark.s3
def test_images_listed_from_s3(bucket, tmp_path):
    from convcache.datasets import discover_all

    data = make_dataset(tmp_path / "data", splits={"train": 3, "validation": 2})
    _upload(data, f"{bucket}/imgs")
    local, classes_l, _ = discover_all(str(data))
    remote, classes_r, _ = discover_all(f"s3://{bucket}/imgs/")
    assert classes_l == classes_r == ["cats", "dogs"]
    rel = lambda items, base: [(i.path.split(base, 1)[1], i.label, i.split) for i in items]
    assert rel(remote, "/imgs") == rel(local, str(data))
    # a manifest at a URL, with relative and absolute (URL) paths
    manifest = "path,label,split\ntrain/cats/cats.0.jpg,cats,train\n" \
               f"s3://{bucket}/imgs/train/dogs/dogs.1.jpg,dogs,train\n"
    import s3fs

    s3fs.S3FileSystem().pipe(f"{bucket}/imgs/list.csv", manifest.encode())
    items, classes, _ = discover_all(f"s3://{bucket}/imgs/list.csv")
    assert [i.path for i in items] == [f"s3://{bucket}/imgs/train/cats/cats.0.jpg",
                                       f"s3://{bucket}/imgs/train/dogs/dogs.1.jpg"]


@pytest.mark.s3
def test_images_on_object_storage_are_fetched_once_per_run(extractor, bucket, tmp_path, monkeypatch):
    """Read once (issue 29): the bytes fetched to hash an object are the ones decoded, so each image costs one GET
    a run, not two; the features are a local run's."""
    from convcache import location
    from convcache.extract import FeatureStore
    from convcache.extract.runner import ExtractConfig, run_extract

    data = make_dataset(tmp_path / "data", splits={"train": 3, "validation": 2})
    _upload(data, f"{bucket}/imgs")
    fetched, real = [], location.read_url
    monkeypatch.setattr(location, "read_url", lambda url, *a, **k: fetched.append(url) or real(url, *a, **k))
    s = run_extract(ExtractConfig(model=str(extractor), data=f"s3://{bucket}/imgs/", output=str(tmp_path / "s3.zarr"),
                                  augment=1, decode_in="threads", progress=False))
    assert s.rows_written == 6 * 2 + 4 and sorted(fetched) == sorted(set(fetched)) and len(fetched) == 10
    monkeypatch.undo()
    run_extract(ExtractConfig(model=str(extractor), data=str(data), output=str(tmp_path / "local.zarr"), augment=1,
                              decode_in="threads", progress=False))
    a, b = FeatureStore(tmp_path / "s3.zarr").load("train"), FeatureStore(tmp_path / "local.zarr").load("train")
    np.testing.assert_array_equal(a.features, b.features)
    assert list(a.sha256) == list(b.sha256)


@pytest.mark.s3
@pytest.mark.long  # minutes under load: `make test-long`
def test_s3_store_written_killed_resumed_and_trained(extractor, bucket, tmp_path):
    """Images and store on the S3 endpoint: a run killed mid-way resumes to the same rows as a local
    run, `extract --verify` passes, and `train --features s3://...` reads it back."""
    import s3fs

    data = make_dataset(tmp_path / "data", splits={"train": 10, "validation": 4})
    _upload(data, f"{bucket}/imgs")
    store = f"s3://{bucket}/feats.zarr"
    args = ["extract", "--model", extractor, "--data", f"s3://{bucket}/imgs/", "-o", store, "--augment", 2,
            "--chunk-rows", 2, "-q"]
    proc = subprocess.Popen([sys.executable, "-m", "convcache", *map(str, args)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    fs = s3fs.S3FileSystem()

    def committed():
        try:
            fs.invalidate_cache()
            return json.loads(fs.cat_file(f"{bucket}/feats.zarr/train/zarr.json"))["attributes"]["committed_rows"]
        except (FileNotFoundError, ValueError, KeyError):
            return 0

    deadline = time.time() + 120
    try:
        while time.time() < deadline and committed() == 0 and proc.poll() is None:
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    at_kill = committed()
    assert 0 < at_kill < 60
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert f"-> {store}" in r.stdout
    assert not Path("s3:").exists()
    assert run_cli("extract", "--verify", "-o", store).returncode == 0
    from convcache.extract.runner import ExtractConfig, run_extract

    run_extract(ExtractConfig(model=str(extractor), data=str(data), output=str(tmp_path / "one.zarr"), augment=2,
                              progress=False))
    assert_same_rows(tmp_path / "one.zarr", store, paths=False)
    t = run_cli("train", "--features", store, "-o", tmp_path / "head", "--C", "0.1")
    assert t.returncode == 0, t.stderr
    metrics = json.loads((tmp_path / "head" / "metrics.json").read_text())
    assert metrics["provenance"]["store"] == store and metrics["rows"]["train"] == 60


def test_bad_urls_fail_before_work(extractor, tmp_path):
    data = make_dataset(tmp_path / "data", splits={"train": 2})
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    r = subprocess.run([sys.executable, "-m", "convcache", "extract", "--model", str(extractor), "--data", str(data),
                        "-o", "foo://bucket/x.zarr"], capture_output=True, text=True, cwd=cwd)
    assert r.returncode == 2 and "unknown scheme 'foo://'" in r.stderr and "Traceback" not in r.stderr
    assert list(cwd.iterdir()) == []  # no folder named foo: or s3:
    r = run_cli("extract", "--model", extractor, "--data", data, "-o", "https://example.com/x.zarr")
    assert r.returncode == 2 and "cannot hold a store" in r.stderr
    r = run_cli("train", "--features", "s3://", "-o", tmp_path / "h")
    assert r.returncode == 2 and "needs a bucket" in r.stderr
    r = run_cli("extract", "--model", extractor, "--data", data, "-o", tmp_path / "x.zarr", "--storage-option", "oops")
    assert r.returncode == 2 and "KEY=VALUE" in r.stderr
    r = run_cli("extract", "--model", extractor, "--data", data, "-o", tmp_path / "x.zarr", "--cluster", "remote:3")
    assert r.returncode == 2 and "local:N" in r.stderr
    r = run_cli("extract", "--model", extractor, "--data", data, "-o", tmp_path / "x.zarr", "--scheduler",
                "tcp://127.0.0.1:9", env={"DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "2s"})
    assert r.returncode == 2 and "cannot connect" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.s3
def test_missing_bucket_is_one_line(s3_endpoint, tmp_path):
    r = run_cli("train", "--features", "s3://no-such-bucket-here/x.zarr", "-o", tmp_path / "h")
    assert r.returncode == 2 and r.stderr.count("\n") <= 1 and "Traceback" not in r.stderr
    r = run_cli("extract", "--verify", "-o", "s3://no-such-bucket-here/x.zarr")
    assert r.returncode == 2 and "Traceback" not in r.stderr


# ---------------------------------------------------------------- training that streams

@pytest.fixture(scope="module")
def pooled_store(pooled_extractor, tmp_path_factory):
    from convcache.extract.runner import ExtractConfig, run_extract

    root = tmp_path_factory.mktemp("stream")
    data = make_dataset(root / "data", splits={"train": 12, "validation": 6})
    run_extract(ExtractConfig(model=str(pooled_extractor), data=str(data), output=str(root / "s.zarr"), augment=2,
                              chunk_rows=8, progress=False))
    return root / "s.zarr"


def test_iter_blocks_reads_every_committed_row_once_and_checks_digests(pooled_store, tmp_path):
    import shutil

    from convcache.errors import ConvcacheError
    from convcache.store import FeatureStore

    store = FeatureStore(pooled_store)
    whole = store.load("train")
    blocks = list(store.iter_blocks("train"))  # spans of whole chunks of every column (1,024-row small columns)
    assert sum(len(b) for b in blocks) == len(whole) and max(len(b) for b in blocks) <= 2 * 1024
    assert np.array_equal(np.concatenate([b.features for b in blocks]), whole.features)
    shuffled = list(store.iter_blocks("train", shuffle=True, seed=3, max_copy=1))
    keys = [(s, c) for b in shuffled for s, c in zip(b.sha256, b.copy)]
    want = [(s, c) for s, c in zip(whole.sha256, whole.copy) if c <= 1]
    assert sorted(keys) == sorted(want) and keys != want
    # a chunk altered on disk: iterating names the rows instead of training on them
    bad = tmp_path / "bad.zarr"
    shutil.copytree(pooled_store, bad)
    chunk = bad / "train" / "features" / "c" / "1" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    with pytest.raises(ConvcacheError, match="rows 8..15"):
        for _ in FeatureStore(bad).iter_blocks("train"):
            pass


def test_streaming_logreg_matches_in_memory_head():
    """On a problem with a known optimum, the out-of-core probe (same C grid) scores as the LBFGS one."""
    from sklearn.datasets import make_classification

    from convcache.train.heads import LogRegHead, StreamingLogRegHead

    X, y = make_classification(n_samples=3000, n_features=60, n_informative=12, class_sep=0.8, random_state=0)
    Xtr, ytr, Xva, yva, Xte, yte = X[:2000], y[:2000], X[2000:2500], y[2000:2500], X[2500:], y[2500:]
    exact = LogRegHead().fit(Xtr, ytr, Xva, yva)
    stream = StreamingLogRegHead(block_rows=128, epochs=8).fit(Xtr, ytr, Xva, yva)
    a, b = exact.score(Xte, yte), stream.score(Xte, yte)
    assert abs(a - b) <= 0.02, (a, b)
    assert stream.best_epoch_ >= 1 and stream.n_rows_ == 2000
    p = stream.predict_proba(Xte[:5])
    assert p.shape == (5, 2) and np.allclose(p.sum(1), 1)


def test_train_streams_when_the_split_exceeds_the_memory_budget(pooled_store, tmp_path):
    from convcache.store import FeatureStore

    need = 2 * FeatureStore(pooled_store).nbytes("train")
    r = run_cli("train", "--features", pooled_store, "-o", tmp_path / "s", "--memory-budget", str(need // 4))
    assert r.returncode == 0, r.stderr
    assert "streamed from the store" in r.stdout
    m = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert m["streaming"] and m["head"] == "logreg-stream" and m["rows"]["train"] == 72
    assert m["onnx_max_abs_diff"] <= 1e-4 and (tmp_path / "s" / "head.onnx").is_file()
    full = run_cli("train", "--features", pooled_store, "-o", tmp_path / "m", "--memory-budget", str(need * 2))
    assert full.returncode == 0 and "streamed" not in full.stdout
    m2 = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert not m2["streaming"] and m2["head"] == "logreg"
    assert abs(m["report"]["accuracy"] - m2["report"]["accuracy"]) <= 0.25  # tiny fixture: 6 report images
    r = run_cli("train", "--features", pooled_store, "-o", tmp_path / "r", "--head", "dense", "--schedule", "replay",
                "--memory-budget", "1kB")
    assert r.returncode == 2 and "random access" in r.stderr and "Traceback" not in r.stderr


def test_dense_head_streams_from_the_same_blocks(pooled_store, tmp_path):
    r = run_cli("train", "--features", pooled_store, "-o", tmp_path / "d", "--head", "dense", "--epochs", 3,
                "--memory-budget", "1kB", "--learning-rate", "1e-3", "-q")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "d" / "metrics.json").read_text())
    assert m["streaming"] and m["head"] == "dense" and m["epochs"] == 3
    from convcache.store import FeatureStore

    spans = [len(b) for b in FeatureStore(pooled_store).iter_blocks("train")]  # batches of 20 within each span
    assert sum(spans) == 72 and m["steps"] == 3 * sum(-(-n // 20) for n in spans)
    assert m["onnx_max_abs_diff"] <= 1e-4


# ---------------------------------------------------------------- one writer per store on object storage

@pytest.mark.s3
@pytest.mark.long  # minutes under load: `make test-long`
def test_second_writer_on_s3_is_refused_while_the_first_holds_the_lease(extractor, bucket, tmp_path):
    import s3fs

    data = make_dataset(tmp_path / "data", splits={"train": 10})
    store = f"s3://{bucket}/one.zarr"
    args = ["extract", "--model", extractor, "--data", data, "-o", store, "--augment", 3, "--chunk-rows", 2, "-q"]
    first = subprocess.Popen([sys.executable, "-m", "convcache", *map(str, args)], start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    fs = s3fs.S3FileSystem()
    try:
        deadline = time.time() + 60
        while time.time() < deadline and first.poll() is None:
            fs.invalidate_cache()
            if fs.exists(f"{bucket}/one.zarr/train/zarr.json"):
                break
            time.sleep(0.02)
        lease = json.loads(fs.cat_file(f"{bucket}/one.zarr.lock"))
        assert lease["pid"] == first.pid and lease["expires"] > time.time()
        first.send_signal(signal.SIGSTOP)  # held mid-run, its lease live, however fast the rest of its run would be
        try:
            assert first.poll() is None, "the first writer finished before the second started"
            second = run_cli(*args)
        finally:
            first.send_signal(signal.SIGCONT)
        assert second.returncode == 2 and "holds this store's lease" in second.stderr, second.stderr
        assert first.wait(timeout=120) == 0, first.stderr.read()
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    fs.invalidate_cache()
    assert not fs.exists(f"{bucket}/one.zarr.lock")  # released at the end
    assert run_cli(*args).returncode == 0  # and free again


@pytest.mark.s3
def test_a_writer_that_lost_its_lease_stops_before_committing(bucket):
    import s3fs

    from convcache.errors import ConvcacheError
    from convcache.store.lease import writer_lock

    fs = s3fs.S3FileSystem()
    with pytest.raises(ConvcacheError, match="lost the writer lease"):
        with writer_lock(f"s3://{bucket}/x.zarr", lease_seconds=30) as guard:
            guard()  # ours: fine
            fs.pipe_file(f"{bucket}/x.zarr.lock", json.dumps({"owner": "someone else", "host": "elsewhere", "pid": 1,
                                                               "expires": time.time() + 30}).encode())
            guard()
    with pytest.raises(ConvcacheError, match="holds this store's lease"):  # and the other holder keeps it
        with writer_lock(f"s3://{bucket}/x.zarr"):
            pass
    fs.pipe_file(f"{bucket}/x.zarr.lock", json.dumps({"owner": "gone", "host": "elsewhere", "pid": 1,
                                                       "expires": time.time() - 1}).encode())
    with writer_lock(f"s3://{bucket}/x.zarr") as guard:  # an expired lease is taken over
        guard()
        assert json.loads(fs.cat_file(f"{bucket}/x.zarr.lock"))["pid"] == os.getpid()


@pytest.mark.s3
def test_workers_without_the_storage_environment_stop_before_anything_is_created(extractor, bucket, dask_cluster,
                                                                                   tmp_path):
    """Issue 19, item 9: workers that lack the client's credentials would turn every image into a skipped
    file. One real read on a worker first: one line naming the environment, and no store, no lease."""
    import os

    import s3fs
    from dask.distributed import Client

    from convcache.errors import ConvcacheError
    from convcache.extract.runner import ExtractConfig, run_extract

    data = make_dataset(tmp_path / "data", splits={"train": 2, "validation": 1})
    _upload(data, f"{bucket}/imgs")
    keys = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")

    def forget():
        import s3fs as worker_s3fs

        worker_s3fs.S3FileSystem.clear_instance_cache()
        return {k: os.environ.pop(k, None) for k in keys}

    with Client(dask_cluster.scheduler_address) as client:
        saved = client.run(forget)
        try:
            with pytest.raises(ConvcacheError, match="the Dask workers cannot read .* AWS_ACCESS_KEY_ID"):
                run_extract(ExtractConfig(model=str(extractor), data=f"s3://{bucket}/imgs/",
                                          output=f"s3://{bucket}/f.zarr", scheduler=dask_cluster.scheduler_address,
                                          progress=False))
        finally:
            client.run(lambda: os.environ.update({k: v for k, v in next(iter(saved.values())).items() if v}))
    fs = s3fs.S3FileSystem()
    assert not fs.exists(f"{bucket}/f.zarr") and not fs.exists(f"{bucket}/f.zarr.lock")


def test_quiet_distributed_extract_prints_no_dask_info_lines(extractor, tmp_path):
    """Issue 21, item 8: Dask logs its start-up at INFO; without -v a run prints only its result line."""
    data = make_dataset(tmp_path / "data", splits={"train": 2, "validation": 1})
    r = run_cli("extract", "--model", extractor, "--data", data, "-o", tmp_path / "f.zarr", "--cluster", "local:2",
                "-q", isolated=True)
    assert r.returncode == 0, r.stderr
    assert "INFO" not in r.stderr and "INFO" not in r.stdout and r.stdout.startswith("extracted ")


@pytest.mark.s3
def test_a_renewal_never_overwrites_another_writers_lease(bucket):
    """The renewal is a conditional PUT on the ETag this writer last wrote: even when its read raced
    another writer's takeover (simulated: the read says "ours"), the PUT is refused and the lease is lost."""
    import s3fs

    from convcache.location import resolve
    from convcache.store.lease import Lease

    lease = Lease(resolve(f"s3://{bucket}/x.zarr").sibling(".lock"), "x", 30)
    lease.acquire()
    try:
        assert lease.etag and lease.renew_once() and not lease.lost  # its own object: renewed
        fs = s3fs.S3FileSystem()
        other = json.dumps({"owner": "other", "host": "elsewhere", "pid": 1, "expires": time.time() + 100})
        fs.pipe_file(f"{bucket}/x.zarr.lock", other.encode())
        lease._read = lambda: {"owner": lease.owner, "expires": time.time() + 10}  # the race
        assert not lease.renew_once() and "conditional renewal was refused" in lease.lost
        fs.invalidate_cache()
        assert json.loads(fs.cat_file(f"{bucket}/x.zarr.lock"))["owner"] == "other"  # untouched
    finally:
        lease._stop.set()


@pytest.mark.s3
def test_a_writer_stopped_past_its_lease_damages_nothing(extractor, bucket, tmp_path):
    """Issue 19's reproduction on S3: writer A is SIGSTOPped past its lease, writer B takes the store over and
    finishes (rc 0), then A is SIGCONTed. A stops at its next mutation (its own clock says the lease is a term
    old), changes nothing, and the store verifies intact against the arrays' own metadata."""
    import s3fs
    import zarr

    data = make_dataset(tmp_path / "data", splits={"train": 5})
    store = f"s3://{bucket}/s.zarr"
    args = ["extract", "--model", extractor, "--data", data, "-o", store, "--augment", 11, "--chunk-rows", 4, "-q"]
    a = subprocess.Popen([sys.executable, "-m", "convcache", *map(str, args)], start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "CONVCACHE_LEASE_SECONDS": "10"})  # 3 s lost it under stress-ng
    fs = s3fs.S3FileSystem()
    try:
        deadline = time.time() + 120
        while time.time() < deadline and a.poll() is None:
            fs.invalidate_cache()
            try:
                if json.loads(fs.cat_file(f"{bucket}/s.zarr/train/zarr.json"))["attributes"]["committed_rows"] > 0:
                    break
            except (FileNotFoundError, KeyError, ValueError):
                pass
            time.sleep(0.05)
        assert a.poll() is None, f"A finished before it could be stopped: {a.stderr.read()[-500:]}"
        os.kill(a.pid, signal.SIGSTOP)

        def expired():  # A's lease record, as B will read it: past its expiry
            fs.invalidate_cache()
            return json.loads(fs.cat_file(f"{bucket}/s.zarr.lock"))["expires"] < time.time()

        wait_for(expired, timeout=60, what="the stopped writer's lease to expire")
        b = run_cli(*args)
        assert b.returncode == 0, b.stderr
        os.kill(a.pid, signal.SIGCONT)
        code, err = a.wait(timeout=60), a.stderr.read()
        assert code == 2 and "lost the writer lease" in err and "Traceback" not in err, err
    finally:
        if a.poll() is None:
            os.killpg(a.pid, signal.SIGKILL)
    r = run_cli("extract", "--verify", "-o", store)
    if r.returncode:  # A was stopped inside a consolidation, which it finished on SIGCONT: its older token
        assert "fencing token 1 < 2" in r.stdout, r.stdout  # shows, and the next run refreshes the root
        assert run_cli(*args).returncode == 0
        assert run_cli("extract", "--verify", "-o", store).returncode == 0
    fs.invalidate_cache()
    group = zarr.open_group(f"s3://{bucket}/s.zarr", path="train", mode="r", use_consolidated=False)
    rows = group.attrs["committed_rows"]
    assert rows == len(list(Path(data).rglob("*.jpg"))) * 12
    assert all(group[n].shape[0] == rows for n in ("features", "label", "copy", "sha256"))
    root_fence = zarr.open_group(f"s3://{bucket}/s.zarr", mode="r", use_consolidated=False).attrs["writer_fence"]
    # the root never behind a split (a run with nothing to commit, like the third above, takes a token and
    # refreshes the snapshot without writing the split)
    assert root_fence >= group.attrs["writer_fence"] >= 2
