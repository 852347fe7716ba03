"""`convcache bench`: each benchmark runs end to end on tiny fixtures and prints its table (a smoke test:
the numbers themselves belong in docs/benchmarks.md, measured on real photos)."""

from __future__ import annotations

import json

import pytest
from conftest import SIZE, make_dataset, run_cli

pytestmark = pytest.mark.slow


def test_bench_extract_prints_the_pipeline_against_bare_inference(pooled_extractor, tmp_path):
    data = make_dataset(tmp_path / "d", splits={"train": 4})
    r = run_cli("bench", "extract", "--data", data, "--images", 8, "--augment", 1, "--model", pooled_extractor,
                "--size", SIZE, "--dtypes", "float32", "--rounds", 1, "--batch-size", 4)
    assert r.returncode == 0, r.stderr
    assert "| bare inference on pre-decoded arrays |" in r.stdout and "| full pipeline, float32 store |" in r.stdout


def test_bench_runtime_reports_every_runtime(pooled_extractor, tmp_path):
    data = make_dataset(tmp_path / "d", splits={"train": 4})
    r = run_cli("bench", "runtime", "--fp32", pooled_extractor, "--int8", pooled_extractor, "--size", SIZE,
                "--seconds", 0.2, "--rounds", 1, "--pipeline-images", 4, "--data", data)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert {"ONNX Runtime fp32", "ONNX Runtime int8", "Keras predict fp32"} <= set(rep["img_per_s"])
    assert rep["img_per_s"]["ONNX Runtime fp32"]["pipeline"] > 0


def test_bench_serve_loads_the_service_and_soaks_it(fused_model, tmp_path):
    data = make_dataset(tmp_path / "d", splits={"validation": 2})
    r = run_cli("bench", "serve", "--model", fused_model, "--data", data, "--images", 2, "--soak", 30,
                "--soak-clients", 4)
    assert r.returncode == 0, r.stderr
    soak = next(line for line in r.stdout.splitlines() if line.startswith("soak:"))
    assert "| clients | requests |" in r.stdout and "soak: 30 requests" in soak and "500:" not in soak


def test_bench_names_an_unknown_benchmark():
    r = run_cli("bench", "nope")
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_bench_extract_null_device_measures_the_input_pipeline_against_pillow(pooled_extractor, tmp_path):
    data = make_dataset(tmp_path / "d", splits={"train": 4})
    r = run_cli("bench", "extract", "--device", "null", "--data", data, "--images", 8, "--augment", 2, "--model",
                pooled_extractor, "--size", SIZE, "--rounds", 1, "--batch-size", 4, "--workers", 2)
    assert r.returncode == 0, r.stderr
    assert "| pillow, 2 processes |" in r.stdout and "| as it ships (decode_in auto: threads) |" in r.stdout
    assert "| decode once, processes |" in r.stdout  # 8 images, 2 workers: auto decodes in threads
    shipped = next(x for x in r.stdout.splitlines() if x.startswith("| as it ships"))
    before = next(x for x in r.stdout.splitlines() if x.startswith("| every copy decoded, threads"))
    assert shipped.rstrip("| ").endswith("| 8") and before.rstrip("| ").endswith("| 24")  # decodes: 8 vs 8 x 3
    # the stricter peer (plain Pillow), and the marginal rate from a run on a quarter of the photos (2 of them)
    assert "| plain Pillow (open, draft, RGB, resize), 2 processes |" in r.stdout
    assert "plain Pillow gives convcache's pixels for 8 of the 8 photos" in r.stdout
    quarter = next(x for x in r.stdout.splitlines() if x.startswith("| as it ships, a quarter of the photos |"))
    assert quarter.rstrip("| ").endswith("| 2")
    assert "| as it ships, marginal (fixed costs out) |" in r.stdout  # its value: noise at 8 vs 2 photos


def test_marginal_rate_is_the_slope_and_fixed_seconds_the_intercept_of_two_runs():
    import math

    from convcache.stats import marginal_rate

    rate, fixed = marginal_rate(2000, 2.36, 500, 0.86)  # 1,500 more rows in 1.5 more seconds
    assert math.isclose(rate, 1000.0) and math.isclose(fixed, 0.36)
    assert all(math.isnan(x) for x in marginal_rate(2000, 0.8, 500, 0.86))  # the larger run no slower: no line


def test_ratio_interval_is_a_geometric_mean_with_a_t_interval_over_rounds():
    """The peer benchmarks' summary (convcache.stats.ratio_interval): per-round ratios, paired by round."""
    import math

    from scipy import stats

    from convcache.stats import ratio_interval, ratio_text

    r = ratio_interval([2.0, 0.5])
    assert math.isclose(r["ratio"], 1.0) and r["ahead"] == 1 and r["rounds"] == 2
    half = stats.t.ppf(0.975, 1) * math.log(2) * math.sqrt(2) / math.sqrt(2)
    assert math.isclose(r["high"], math.exp(half)) and math.isclose(r["low"] * r["high"], 1.0)
    same = ratio_interval([1.1, 1.1, 1.1])
    assert math.isclose(same["low"], 1.1) and math.isclose(same["high"], 1.1) and same["ahead"] == 3
    assert ratio_text([0.9]) == "0.90x, ahead 0 of 1"


def test_the_peer_bench_pauses_the_server_it_is_not_measuring():
    """`bench serve --peer`: the idle server's whole process tree (a parent and its child here, as LitServe's
    server and workers) uses no CPU while paused, and runs again after."""
    import subprocess
    import sys
    import time

    from convcache.benchmarks.serve import Paused, cpu_seconds, process_tree

    spin = "import time\nwhile True: time.perf_counter()"
    parent = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys\nsubprocess.Popen([sys.executable, "
                                                    f"'-c', {spin!r}])\n{spin}"])
    try:
        deadline = time.monotonic() + 60
        while len(process_tree(parent.pid)) < 2:  # the child has started
            assert time.monotonic() < deadline, "the child process never started"
            time.sleep(0.05)
        with Paused(parent.pid) as paused:
            assert len(paused.procs) == 2
            time.sleep(0.2)  # a stop is delivered asynchronously: let it land before measuring
            before = cpu_seconds(parent.pid)
            time.sleep(0.5)
            assert cpu_seconds(parent.pid) - before < 0.02  # stopped processes cannot run
        before = cpu_seconds(parent.pid)
        while cpu_seconds(parent.pid) - before < 0.1:  # both resumed: the tree uses CPU again
            assert time.monotonic() < deadline, "the paused tree did not resume"
            time.sleep(0.05)
        assert all(p.status() != "stopped" for p in process_tree(parent.pid))
    finally:
        for p in reversed(process_tree(parent.pid)):
            p.kill()
        parent.wait(10)


def test_thread_cpu_tells_a_busy_thread_from_a_waiting_one():
    """convcache.benchmarks.threadcpu: CPU seconds by thread name (numbered pools folded), from /proc. Each spinner
    stops once it has used 0.4 s of CPU by its own clock, so a loaded machine changes only how long it takes."""
    import threading
    import time

    from convcache.benchmarks.threadcpu import ThreadCPU

    def spin():
        t = time.thread_time()
        while time.thread_time() - t < 0.4:
            pass

    done = threading.Event()
    with ThreadCPU() as cpu:
        busy = [threading.Thread(target=spin, name=f"spin_{i}") for i in range(2)]
        idle = threading.Thread(target=done.wait, name="idle")
        for t in (*busy, idle):
            t.start()
        for t in busy:
            t.join()
        done.set()
        idle.join()
    # 0.8 s used (at the kernel's 10 ms ticks); each spinner may end up to one 50 ms sample after the last
    assert 0.65 <= cpu.seconds.get("spin_N", 0) <= 0.85, cpu.seconds
    assert cpu.seconds.get("idle", 0) <= 0.05, cpu.seconds
