"""experiments/ (studies and one-off benchmarks, apart from the product) still import and run against the
package as it is now: every script's --help, the shell scripts' syntax, and the scripts that read or write
stores on a tiny fixture (a moved attribute once made freeze_boundary.py read zero extraction runs)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import export, make_dataset

from convcache.extract.runner import ExtractConfig, run_extract
from convcache.store import FeatureStore

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
SCRIPTS = sorted(p for p in EXPERIMENTS.rglob("*.py") if "archive" not in p.parts)
SHELL = sorted(EXPERIMENTS.rglob("*.sh"))

pytestmark = pytest.mark.slow  # a fresh interpreter per script


def test_the_readme_names_every_script():
    readme = (EXPERIMENTS / "README.md").read_text()
    missing = [str(p.relative_to(EXPERIMENTS)) for p in [*SCRIPTS, *SHELL] if p.name not in readme]
    assert not missing, f"experiments/README.md does not say what these reproduce: {missing}"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(EXPERIMENTS)))
def test_every_script_imports_and_parses_its_arguments(script):
    r = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120,
                       cwd=EXPERIMENTS.parent)
    assert r.returncode == 0 and "usage" in r.stdout.lower(), r.stderr[-2000:]


@pytest.mark.parametrize("script", SHELL, ids=lambda p: str(p.relative_to(EXPERIMENTS)))
def test_every_shell_script_parses(script):
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def tiny_store(extractor, tmp_path_factory):
    root = tmp_path_factory.mktemp("experiments")
    data = make_dataset(root / "data", splits={"train": 4, "validation": 2})
    store = root / "f.zarr"
    run_extract(ExtractConfig(model=str(extractor), data=str(data), output=str(store), augment=1, chunk_rows=4,
                              progress=False))
    return store


def _load(script: Path):
    """A script as a module (its own folder first on the import path, as when it is run)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(script.stem, script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_freeze_boundary_reads_the_extraction_runs_of_a_store(tiny_store):
    fb = _load(EXPERIMENTS / "study" / "freeze_boundary.py")
    runs = FeatureStore(tiny_store).runs("train")
    assert runs and runs[0]["rows"] == 16
    seconds = fb._extraction_seconds(tiny_store, 0, train_images=8, validation=4)
    rate = {s: sum(r["seconds"] for r in FeatureStore(tiny_store).runs(s)) / sum(r["rows"] for r in
                                                                                 FeatureStore(tiny_store).runs(s))
            for s in ("train", "validation")}
    assert seconds == pytest.approx(rate["train"] * 8 + rate["validation"] * 4) and seconds > 0


def test_bench_streaming_builds_a_tiled_store_that_verifies(tiny_store, tmp_path, capsys):
    bs = _load(EXPERIMENTS / "bench_streaming.py")
    big = tmp_path / "big.zarr"
    bs.build_big(str(tiny_store), str(big), gigabytes=16 * 3 * 512 * 4 / 1e9)  # 3 tiles of the 16 train rows
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert printed[0] == {"split": "train", "rows": 48, "gigabytes": 0.0}
    fs, src = FeatureStore(big), FeatureStore(tiny_store)
    for split in fs.splits:
        assert fs.verify(split) == ([], None)
    train = fs.load("train")
    assert len(train) == 48 and len(set(zip(train.sha256, train.copy.tolist()))) == 48  # every row unique
    assert (train.features[:16] == src.load("train").features).all() and fs.rows("validation") == 4


@pytest.mark.tf
@pytest.mark.long  # the study's stages on a tiny store, ~1 min: `make test-long`
def test_the_layers_study_runs_stages_a_and_c_on_a_tapped_store(tmp_path):
    export("random", 32, str(tmp_path / "taps.onnx"), taps=("block1_pool:avg", "block2_pool:max"), seed=1)
    data = make_dataset(tmp_path / "data", splits={"train": 6, "validation": 4})
    run_extract(ExtractConfig(model=str(tmp_path / "taps.onnx"), data=str(data), output=str(tmp_path / "t.zarr"),
                              augment=2, augment_splits=("train", "validation"), progress=False))
    script = EXPERIMENTS / "study" / "layers.py"
    for args in (["run", "--store", tmp_path / "t.zarr", "--stage", "A", "--seeds", 0, 1],
                 ["run", "--store", tmp_path / "t.zarr", "--stage", "B", "--seeds", 0, 1],
                 ["run", "--store", tmp_path / "t.zarr", "--stage", "C", "--seeds", 0, 1],
                 ["run", "--store", tmp_path / "t.zarr", "--stage", "F", "--seeds", 0, 1], ["summary"]):
        r = subprocess.run([sys.executable, str(script), *map(str, args), "-o", str(tmp_path / "out")],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
    lines = [json.loads(x) for x in (tmp_path / "out" / "runs.jsonl").read_text().splitlines()]
    a = [x for x in lines if x["stage"] == "A"]
    assert len(a) == 2 * 2  # 2 seeds x the 2 taps (no concatenation applies to these)
    assert all(len(x["correct"]) == 20 and len(x["C"]) == 5 for x in a)  # every photo once, C per outer fold
    b = [x for x in lines if x["stage"] == "B"]  # stage A's winner (the plan's four are not taps here) x K x seeds
    assert len(b) == 4 * 2 and {x["representation"] for x in b} < {"block1_pool_avg", "block2_pool_max"}
    c = [x for x in lines if x["stage"] == "C"]
    assert sorted({x["copies"] for x in c}) == ["method1", "method2"] and len(c) == 2 * 2
    f = [x for x in lines if x["stage"] == "F"]
    assert len(f) == 2 and all(len(x["correct"]) == 20 and x["fit"]["steps"][0] == 0 for x in f)
    assert all(len(x["correct"]) == 20 and len(x["best_epochs"]) == 5 for x in c)


def test_the_gpu_measurement_measures_this_checkouts_code_whatever_is_installed_ahead_of_it(extractor, tmp_path):
    """On the device, setup.sh puts a wheel of the project first on PYTHONPATH; one left from an older
    prepare.sh must not be what measure.py measures (nor the processes it starts)."""
    stale = tmp_path / "site" / "convcache"
    stale.mkdir(parents=True)
    (stale / "__init__.py").write_text("raise ImportError('a stale wheel of convcache')\n")
    (stale / "__main__.py").write_text("raise SystemExit('a stale wheel of convcache')\n")
    data = make_dataset(tmp_path / "data", splits={"train": 2})
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(EXPERIMENTS / "gpu" / "measure.py"), "--device", "cpu", "--quick",
                        "--model", str(extractor), "--data", str(data), "--out", str(out), "--images", "4",
                        "--sections", "env"], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "gpu.json").read_text())
    assert res["errors"] == {} and Path(res["env"]["convcache"]) == EXPERIMENTS.parent / "convcache", res
    assert res["env"]["pythonpath"][0] == str(EXPERIMENTS.parent)  # and first for the processes it starts


def test_the_gpu_measurement_runs_end_to_end_on_the_cpu(extractor, fused_model, tmp_path):
    """experiments/gpu/measure.py is what a 15-minute GPU loan runs, with no time to debug it there: its dry run
    on the CPU goes through every section that needs no GPU tool, records each section's result (a fp16 resume
    refused, fp16 features beside fp32's), and fails no section."""
    data = make_dataset(tmp_path / "data", splits={"train": 7})
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(EXPERIMENTS / "gpu" / "measure.py"), "--device", "cpu", "--quick",
                        "--model", str(extractor), "--data", str(data), "--out", str(out), "--images", "14",
                        "--size", "32", "--fused", str(fused_model), "--sections", "env", "bare", "null",
                        "pipeline", "parity", "resume", "probe", "predict"], capture_output=True, text=True,
                       timeout=600, cwd=EXPERIMENTS.parent)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "gpu.json").read_text())
    assert res["errors"] == {}, res["errors"]
    assert {"fp32 batch 4 bound", "fp16 batch 4 prestaged"} <= set(res["bare"])
    assert res["pipeline"]["fp16"]["math"] == "fp16" and res["pipeline"]["as it ships"]["math"] == "fp32"
    assert res["resume"]["refused"] and "--allow-mixed" in res["resume"]["message"]
    assert res["parity"]["fp16"]["relative_to_max"] > 0 and res["parity"]["tf32"]["max_abs_diff"] == 0
    assert res["probe"]["images"] == 14 and "fp32" in dict(__import__("numpy").load(out / "features.npz"))
    assert "| pipeline on cpu, as it ships" in (out / "gpu.md").read_text()
    assert set(res["predict"]) == {"one at a time (before), batch 1", "predict_each, batch 32", "predict_each, batch 4"}
    assert all(v["images_per_s"] > 0 for v in res["predict"].values()), res["predict"]
    shipped = res["pipeline"]["as it ships"]  # end to end, the run phase, and the marginal rate (14 against 4)
    assert shipped["run_rows_per_s"] >= shipped["rows_per_s"] > 0 and shipped["run_vs_bare_bound"] > 0
    assert all(t > 0 for t in shipped["session_s"]) and len(shipped["session_wait_s"]) == len(shipped["runs"])
    assert res["pipeline"]["as it ships, a quarter of the photos"]["runs"][0]["rows"] == 4 * 3
    assert res["pipeline"]["originals only (K = 0)"]["runs"][0]["rows"] == 14  # method 1 at the GPU's speed
    # a line through the two runs only where the larger took longer: on 14 photos a loaded machine can reverse them
    assert "marginal_rows_per_s" in shipped and len(shipped["fixed_s"]) == (1 if shipped["marginal_rows_per_s"] else 0)
    assert res["pipeline"]["Pillow decode"]["decoder"] == "pillow"  # the peer of nvJPEG as it ships on a GPU
    null = res["null"]  # with copies and without, as it ships and each way, and with torchvision's decoder
    tv = {k: null.pop(k) for k in list(null) if "--decoder" in k}
    assert set(tv) == {"null, K=2, --decoder torchvision-cpu", "null, K=0, --decoder torchvision-cpu"}
    from convcache.gpudecode import unavailable

    if unavailable("cpu"):  # (torch is not in the dev environment)
        assert all("not measured" in v for v in tv.values())
    else:
        assert all(v["decoder"] == "torchvision-cpu" and v["decoded_by_decoder"] == 14 for v in tv.values())
    assert {k: v["decode_in"] for k, v in null.items() if k.startswith("null, K=0")} == {
        "null, K=0, auto": "threads", "null, K=0, processes": "processes", "null, K=0, threads": "threads"}
    assert null["null, K=0, auto"]["decodes"] == null["null, K=0, auto"]["rows"] == 14
    assert all(v["thread_cpu_s"].get("MainThread", 0) > 0 and 0 < v["main_thread_busy"] <= 1.5 for v in null.values())
    free = [v for k, v in null.items() if k.endswith("threads, decode and warp free")]  # the GIL-bound rest
    assert len(free) == 1 and free[0]["rows"] == 14 * 3 and free[0]["decodes"] == 14


def test_a_gpu_measurement_arm_that_fails_is_recorded_and_the_others_still_run(tmp_path):
    """On the GPU box an arm may fail where nothing here can (nvJPEG's torch beside ONNX Runtime's CUDA, say): the
    pipeline section records that arm's error and still measures the others (the done-when line among them), and
    gpu.md shows the failure."""
    import importlib.util
    from types import SimpleNamespace

    spec = importlib.util.spec_from_file_location("gpu_measure", EXPERIMENTS / "gpu" / "measure.py")
    measure = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(measure)

    def fake(a, data, out, device, augment=None, decoder="auto", **kw):
        if decoder == "auto" and augment is None:  # as it ships, on the GPU box: nvJPEG
            raise RuntimeError("CUDA error: an illegal memory access")
        return {"rows": 10, "rows_per_s": 100.0, "seconds": 0.1, "run_rows_per_s": 120.0, "batch_size": 4,
                "math": "fp16" if kw.get("precision") == "fp16" else "fp32", "decoder": decoder,
                "phases": {"session": 0.1, "session_warm": 0.0, "session_wait": 0.0}}

    measure.extract_rate = fake
    bare = {f"{p} batch 4 bound": {"images_per_s": 200.0} for p in ("fp32", "fp16")}
    a = SimpleNamespace(repeats=2, device="cuda")
    got = measure.pipeline(a, "data", tmp_path, bare, "quarter")
    assert got["as it ships"] == {"error": "RuntimeError: CUDA error: an illegal memory access"}
    assert got["Pillow decode"]["rows_per_s"] == 100.0 and got["Pillow decode"]["vs_bare_bound"] == 0.5
    assert len(got["Pillow decode"]["runs"]) == 2 and "error" in got["fp16"]  # (fp16 decodes with nvJPEG too)
    assert got["originals only (K = 0), Pillow decode"]["decoder"] == "pillow" and "error" not in got[
        "originals only (K = 0)"]
    md = measure.markdown({"pipeline": got}, SimpleNamespace(device="cuda", model="m", images=1, augment=15, size=150,
                                                             repeats=2))
    assert "| pipeline on cuda, as it ships | | failed: RuntimeError: CUDA error" in md
