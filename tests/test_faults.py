"""Fault injection on extract (was bench/stress_faults.py): `kill -9` at random points of a real `convcache
extract` process, each resumed to completion (its hashes from the stat cache the killed run wrote) and
compared bitwise with an uninterrupted run (features, labels, image ids, copies, hashes, paths) and
verified by its block digests. CONVCACHE_FAULT_KILLS sets the
number of kill points (default 5; the stress run in docs/benchmarks.md used 20)."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import make_dataset

from convcache.store import FeatureStore

pytestmark = pytest.mark.slow


def _columns(path):
    store = FeatureStore(path)
    return {s: (lambda d: (d.features, d.labels, d.image, d.copy, d.sha256, d.paths))(store.load(s))
            for s in store.splits}


def _same(a, b) -> bool:
    A, B = _columns(a), _columns(b)
    return A.keys() == B.keys() and all(np.array_equal(np.asarray(x), np.asarray(y))
                                        for s in A for x, y in zip(A[s], B[s]))


def test_kill_9_at_random_points_resumes_bitwise(extractor, tmp_path):
    rng = random.Random(0)
    data = make_dataset(tmp_path / "d", splits={"train": 12, "validation": 4})
    for f in data.rglob("*.jpg"):  # settled files: the resumed runs take their hashes from the stat cache
        os.utime(f, (1_600_000_000, 1_600_000_000))
    cmd = [sys.executable, "-m", "convcache", "extract", "--model", str(extractor), "--data", str(data),
           "--augment", "3", "--batch-size", "2", "--chunk-rows", "4", "--quiet", "-o"]
    t0 = time.perf_counter()
    subprocess.run([*cmd, str(tmp_path / "clean.zarr")], check=True, capture_output=True)
    clean_s = time.perf_counter() - t0
    mid_run = 0
    for k in range(int(os.environ.get("CONVCACHE_FAULT_KILLS", "5"))):
        store = tmp_path / f"k{k}.zarr"
        proc = subprocess.Popen([*cmd, str(store)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, 0.85) * clean_s)  # start-up included: early kills land before any commit
        mid_run += proc.poll() is None
        proc.kill()
        proc.wait()
        meta = store / "train" / "zarr.json"
        committed = json.loads(meta.read_text())["attributes"]["committed_rows"] if meta.exists() else 0
        r = subprocess.run([*cmd, str(store)], capture_output=True, text=True)
        assert r.returncode == 0, f"kill {k} ({committed} rows committed): {r.stderr[-300:]}"
        if committed:  # rows were committed, so train's hashes were saved before: the resumed run reads none
            assert int(re.search(r"(\d+) unchanged \(stat cache", r.stdout).group(1)) >= 24, r.stdout
        assert _same(store, tmp_path / "clean.zarr"), f"kill {k} ({committed} rows committed): not bitwise equal"
        fs = FeatureStore(store)
        assert not any(fs.verify(s)[0] for s in fs.splits)
    assert mid_run >= 1, "no kill landed while the run was in flight"


def test_ctrl_c_keeps_committed_rows_says_so_and_the_same_command_resumes(pooled_extractor, tmp_path):
    """The pooled extractor's 4 MiB chunks hold 4,096 rows, more than this whole run: rows are still
    committed at least every second, so an interrupt keeps them, says how many, and the same command resumes."""
    import signal

    # 1,600 train rows, several seconds: the local executor commits at least every COMMIT_SECONDS
    data = make_dataset(tmp_path / "d", splits={"train": 200, "validation": 4})
    cmd = [sys.executable, "-m", "convcache", "extract", "--model", str(pooled_extractor), "--data", str(data),
           "--augment", "3", "--batch-size", "2", "--workers", "1", "-o"]
    subprocess.run([*cmd, str(tmp_path / "clean.zarr"), "--quiet"], check=True, capture_output=True)
    store = tmp_path / "f.zarr"
    # a terminal's Ctrl-C: SIGINT at its default disposition in the child (a job started in the background of a
    # non-interactive shell, as CI may run this suite, inherits SIGINT ignored, and Python keeps it ignored)
    proc = subprocess.Popen([*cmd, str(store)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    meta, committed, deadline = store / "train" / "zarr.json", 0, time.time() + 120
    while committed == 0 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
        try:
            committed = json.loads(meta.read_text())["attributes"]["committed_rows"]
        except (OSError, ValueError, KeyError):
            pass
    assert proc.poll() is None, "the run ended before the first commit could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    kept = FeatureStore(store).rows("train")
    assert proc.returncode == 130 and 0 < kept < 1600, (proc.returncode, kept, err[-300:])
    assert f"\ninterrupted: {kept} rows committed in 'train'" in err and "the same command resumes" in err
    subprocess.run([*cmd, str(store), "--quiet"], check=True, capture_output=True)
    assert _same(store, tmp_path / "clean.zarr")
