import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CONVCACHE_XLA", "0")  # XLA-compiling every tiny head costs more than training it
SIZE = 32


def run_cli(*args, env=None, timeout=300, isolated=False):
    """Run `convcache ...` and return a CompletedProcess (returncode, stdout, stderr). In this process
    (`convcache.cli.main`, output captured) unless the test needs a process of its own: an environment
    (`env`) or `isolated=True` (imports, signals, exit at interpreter level). A fresh interpreter costs
    seconds of imports per call; most CLI tests check arguments and messages. `export` runs in the export
    worker (`exporter`): a conversion holds gigabytes this process would keep."""
    if env is None and not isolated and args and str(args[0]) == "export":
        return in_worker(run_cli_in_process, *map(str, args))
    if env is None and not isolated:
        return run_cli_in_process(*args)
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "convcache", *map(str, args)], capture_output=True, text=True,
                          env=full_env, timeout=timeout)


def run_cli_in_process(*args) -> subprocess.CompletedProcess:
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from convcache.cli import main

    out, err = io.StringIO(), io.StringIO()
    argv = [str(a) for a in args]
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse: --help (0) and usage errors (2)
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return subprocess.CompletedProcess(["convcache", *argv], code, out.getvalue(), err.getvalue())


def wait_for(condition, timeout: float = 30.0, what: str = "the condition", interval: float = 0.02):
    """Poll `condition()` until it returns something truthy (returned), or fail after `timeout` seconds: tests
    wait on what they need, never on a fixed sleep."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        got = condition()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def make_image(path: Path, seed: int, size: int = 40, kind: int = 0) -> None:
    """A small photo-like image; `kind` sets a class-dependent pattern so heads can learn it."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0, 60, (size, size, 3))
    yy, xx = np.mgrid[:size, :size]
    if kind == 0:
        base[..., 0] += 150 * (xx > size // 2)
    elif kind == 1:
        base[..., 2] += 150 * (yy > size // 2)
    else:
        base[..., 1] += 150 * ((xx + yy) % 8 < 4)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(path, quality=95)


def make_dataset(root: Path, classes=("cats", "dogs"), splits=None, seed=0) -> Path:
    splits = splits or {"train": 6, "validation": 4}
    for s, (split, n) in enumerate(splits.items()):
        for k, name in enumerate(classes):
            for i in range(n):
                make_image(root / split / name / f"{name}.{i}.jpg", seed=seed * 1000 + s * 100 + k * 10 + i, kind=k)
    return root


# ---------------------------------------------------------------- exports
# Exports write the graph directly (convcache.artifacts.keras_onnx), as `train --train-top` writes
# its block5; a few tests still convert with tf2onnx, which holds ~3.4 GiB converting the whole VGG16 (its
# optimisers copy the weights pass after pass; those tests cut the base early), and TensorFlow keeps much of
# what a task allocated. Exports, conversions and TensorFlow training run in one worker process instead of the
# pytest process (spawned, TensorFlow imported once, replaced when its memory grows), so what a task holds is
# given back. `export(...)` takes `export_extractor`'s arguments.
_EXPORTER = None
_WORKER_COUNTS = {"processes": 0, "tasks": 0}
# The export worker is replaced once its resident memory passes this after a task (each task's keras state is
# cleared and freed heap handed back to the system first), so a worker serves several tasks, and the suite
# pays TensorFlow's start-up only when memory says so.
WORKER_RSS_LIMIT = int(os.environ.get("CONVCACHE_TEST_WORKER_RSS_MB", "2048")) << 20


def exporter():
    global _EXPORTER
    if _EXPORTER is None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        _EXPORTER = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        _WORKER_COUNTS["processes"] += 1
    return _EXPORTER


def _release_keras() -> None:
    import ctypes
    import gc

    from convcache.tfquiet import import_keras

    import_keras()[1].backend.clear_session()
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed arenas resident otherwise
    except (OSError, AttributeError):
        pass


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# CONVCACHE_TEST_WORKER_LOG=FILE: each worker task's name and peak resident MiB (the kernel's high-water mark,
# reset before the task through /proc/self/clear_refs) appended to FILE: which tasks make the worker's peak.
_WORKER_LOG = os.environ.get("CONVCACHE_TEST_WORKER_LOG")


def _peak_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def _task(fn, args: tuple, kwargs: dict):
    """In the worker: (ok, the result or the exception, resident bytes after freeing the task's state)."""
    if _WORKER_LOG:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    try:
        ok, value = True, fn(*args, **kwargs)
    except Exception as exc:  # handed back to the test and raised there
        ok, value = False, exc
    if _WORKER_LOG:
        with open(_WORKER_LOG, "a") as f:
            f.write(f"{getattr(fn, '__qualname__', fn)} {args[:2]!r} {_peak_mib():.0f}\n")
    _release_keras()
    return ok, value, _rss()


def in_worker(fn, *args, **kwargs):
    """`fn(*args, **kwargs)` in the export worker (`fn` a module-level function, e.g. of a test module): for a
    test that converts with tf2onnx or trains with TensorFlow. Its assertion errors come back as raised there."""
    global _EXPORTER
    ok, value, rss = exporter().submit(_task, fn, args, kwargs).result(timeout=600)
    _WORKER_COUNTS["tasks"] += 1
    if rss > WORKER_RSS_LIMIT:
        _EXPORTER.shutdown(wait=True)
        _EXPORTER = None
    if not ok:
        raise value
    return value


def export(*args, **kwargs) -> dict:
    """`convcache.export.runner.export_extractor(*args, **kwargs)` in the export worker."""
    from convcache.export.runner import export_extractor

    return in_worker(export_extractor, *args, **kwargs)


def pytest_sessionfinish(session, exitstatus):
    if _EXPORTER is not None:
        _EXPORTER.shutdown(wait=True, cancel_futures=True)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and _WORKER_COUNTS["tasks"]:
        reporter.write_line(f"export worker: {_WORKER_COUNTS['tasks']} tasks in {_WORKER_COUNTS['processes']} "
                            f"processes (replaced past {WORKER_RSS_LIMIT >> 20} MiB resident)")


@pytest.fixture(scope="session")
def extractor(tmp_path_factory) -> Path:
    """A tiny random-weight extractor (32x32, block5_pool), exported once per session."""
    path = tmp_path_factory.mktemp("models") / "extractor.onnx"
    export("random", SIZE, str(path), seed=1)
    return path


@pytest.fixture(scope="session")
def pooled_extractor(tmp_path_factory) -> Path:
    """A tiny extractor cut at block3_pool and average-pooled: 256 features that carry colour."""
    path = tmp_path_factory.mktemp("models") / "pooled.onnx"
    export("random", SIZE, str(path), layer="block3_pool", pooling="avg", seed=1)
    return path


@pytest.fixture(scope="session")
def fused_model(pooled_extractor, tmp_path_factory) -> Path:
    """extractor + logreg head -> fused model, built through the real stages."""
    from convcache.extract.runner import ExtractConfig, run_extract
    from convcache.train.fuse import fuse
    from convcache.train.runner import train_head

    root = tmp_path_factory.mktemp("fused")
    data = make_dataset(root / "data", splits={"train": 6, "validation": 4})
    run_extract(ExtractConfig(model=str(pooled_extractor), data=str(data), output=str(root / "f.zarr"),
                              progress=False))
    train_head(str(root / "f.zarr"), "logreg", str(root / "head"))
    fuse(str(pooled_extractor), str(root / "head"), str(root / "model.onnx"))
    return root / "model.onnx"


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 endpoint on loopback (moto's server mode, as s3fs' and zarr's own suites use), with
    credentials and AWS_ENDPOINT_URL in the environment as a user would set them."""
    import logging

    moto_server = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def bucket(s3_endpoint, request):
    """A fresh, empty bucket on the loopback endpoint; returns its name."""
    import re

    import boto3

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:50].strip("-") + "-b"
    boto3.client("s3", endpoint_url=s3_endpoint["AWS_ENDPOINT_URL"]).create_bucket(Bucket=name)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # no listings cached from another test's bucket
    return name


@pytest.fixture(scope="module")
def dask_cluster():
    """A real distributed.LocalCluster with 2 worker processes (1 thread each)."""
    distributed = pytest.importorskip("distributed")
    import logging

    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                  silence_logs=logging.ERROR) as cluster:
        yield cluster


# ---------------------------------------------------------------- tiers
# Each test file marks its own tier (`pytestmark = pytest.mark.tf`, `@pytest.mark.slow`; pyproject's
# --strict-markers refuses a misspelt one). `make test` runs everything; `make test-fast` every test that
# carries none of TIER_MARKS: no TensorFlow training, no cluster, no S3 server, no server process, seconds each.
# A test that uses a fixture starting one of those must say so: checked here, never assigned here.
TIER_MARKS = ("slow", "tf", "dask", "s3", "serve", "long")
FIXTURE_TIERS = {"bucket": "s3", "s3_endpoint": "s3", "dask_cluster": "dask", "server": "serve"}


def pytest_collection_modifyitems(config, items):
    unmarked = sorted({f"{item.nodeid.split('[')[0]} uses {fixture} but is not marked {mark}"
                       for item in items for fixture, mark in FIXTURE_TIERS.items()
                       if fixture in getattr(item, "fixturenames", ()) and not item.get_closest_marker(mark)})
    if unmarked:
        raise pytest.UsageError("tests missing their tier marker:\n" + "\n".join(unmarked))


# ---------------------------------------------------------------- memory
# CONVCACHE_TEST_RSS=FILE: after each test, the pytest process's resident set (and its peak so far) is
# appended to FILE as "nodeid rss_mib peak_mib": which tests make the process grow (see `make test-measured`).
_RSS_LOG = os.environ.get("CONVCACHE_TEST_RSS")


def _rss_mib() -> tuple[float, float]:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


if _RSS_LOG:
    @pytest.hookimpl(trylast=True)
    def pytest_runtest_logfinish(nodeid, location):
        rss, peak = _rss_mib()
        with open(_RSS_LOG, "a") as f:
            f.write(f"{nodeid} {rss:.0f} {peak:.0f}\n")
