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
    seconds of imports per call; most CLI tests check arguments and messages."""
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


@pytest.fixture(scope="session")
def extractor(tmp_path_factory) -> Path:
    """A tiny random-weight extractor (32x32, block5_pool), exported once per session."""
    from convcache.export.runner import export_extractor

    path = tmp_path_factory.mktemp("models") / "extractor.onnx"
    export_extractor("random", SIZE, str(path), seed=1)
    return path


@pytest.fixture(scope="session")
def pooled_extractor(tmp_path_factory) -> Path:
    """A tiny extractor cut at block3_pool and average-pooled: 256 features that carry colour."""
    from convcache.export.runner import export_extractor

    path = tmp_path_factory.mktemp("models") / "pooled.onnx"
    export_extractor("random", SIZE, str(path), layer="block3_pool", pooling="avg", seed=1)
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
# `make test` runs everything; `make test-fast` (-m fast) the everyday tier: what needs no TensorFlow
# training, no cluster, no S3 server, no server process, and takes seconds. A test is `fast` unless a
# marker below (or its own) says otherwise: by module, by the fixtures it uses, or by name (measured
# at several seconds each on a 2-core machine).
MODULE_MARKS = {"test_scaleout.py": ("dask",), "test_serve.py": ("serve",), "test_replay.py": ("tf",),
                "test_freeze_boundary.py": ("tf",), "test_export.py": ("tf",)}
FIXTURE_MARKS = {"bucket": "s3", "s3_endpoint": "s3", "dask_cluster": "dask", "server": "serve"}
SLOW = {
    "test_contracts.py": ("test_identity_is_stable_across_exports_and_processes",
                          "test_heads_are_scikit_learn_estimators", "test_logreg_passes_sklearn_estimator_checks"),
    "test_extract.py": ("test_resume_after_kill_matches_clean_run",
                        "test_same_seed_same_features_across_workers_and_batches",
                        "test_incremental_add_computes_only_new"),
    "test_augment.py": ("test_keras3_preset_matches_keras_image_data_generator",),
    "test_hostile.py": ("test_damage_is_named_never_silent_and_repair_recomputes",
                        "test_a_second_writer_fails_at_once_and_nothing_is_lost",
                        "test_corrupt_store_metadata_is_one_line", "test_malformed_dds_is_a_skip_not_a_crash",
                        "test_disk_full_is_one_line_and_keeps_what_was_committed",
                        "test_predict_reports_every_bad_file_and_goes_on"),
    "test_converge.py": ("test_fit_end_to_end_resumes_and_reports_held_out_accuracy",
                         "test_train_learning_rate_auto_searches_on_the_select_half",
                         "test_replay_with_standardized_features_equals_the_end_to_end_reference",
                         "test_standardization_is_fit_on_originals_and_folded_into_the_onnx_head",
                         "test_training_loss_in_the_history_is_the_epoch_mean"),
    "test_train.py": ("test_empty_split_is_an_error", "test_multiclass_heads_and_onnx_parity",
                      "test_heads_learn_a_separable_fixture", "test_compare_end_to_end_tiny",
                      "test_compare_on_an_int8_extractor"),
}
TIER_MARKS = ("slow", "tf", "dask", "s3", "serve")


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.path.name
        for mark in MODULE_MARKS.get(module, ()):
            item.add_marker(mark)
        for fixture, mark in FIXTURE_MARKS.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(mark)
        if item.originalname in SLOW.get(module, ()):
            item.add_marker("slow")
        if not any(item.get_closest_marker(m) for m in TIER_MARKS):
            item.add_marker("fast")
