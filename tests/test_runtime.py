"""Inference runtimes: ONNX Runtime (CPU), the OpenVINO runtime on the same ONNX files, and the report of
what this machine has. OpenVINO tests skip, saying why, where the runtime is not installed."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import SIZE, make_dataset, run_cli

from convcache.runtime import create_session, openvino_version

needs_openvino = pytest.mark.skipif(not openvino_version(), reason="the OpenVINO runtime is not installed "
                                                                    "(pip install 'convcache[openvino]')")


@needs_openvino
def test_openvino_features_agree_with_onnx_runtime(extractor):
    x = (np.random.default_rng(0).random((4, SIZE, SIZE, 3)) * 255).astype(np.float32)
    ort_cpu, ov = create_session(str(extractor), "cpu"), create_session(str(extractor), "openvino")
    assert ov.get_providers() == ["OpenVINO-CPU"]
    a, b = ort_cpu.run(["features"], {"images": x})[0], ov.run(["features"], {"images": x})[0]
    assert a.shape == b.shape
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * np.abs(a).max())
    from_bytes = create_session(extractor.read_bytes(), "openvino")  # as a Dask worker receives the model
    np.testing.assert_array_equal(from_bytes.run(["features"], {"images": x})[0], b)


@needs_openvino
def test_fused_logreg_model_serves_on_openvino(fused_model):
    """A fused model with the linear probe runs on OpenVINO (no ai.onnx.ml ops) with ORT's answers."""
    from convcache.serve import Predictor

    images = [(np.random.default_rng(i).random((40, 40, 3)) * 255).astype(np.uint8) for i in range(5)]
    a = Predictor(str(fused_model), device="cpu").predict(images)
    b = Predictor(str(fused_model), device="openvino")
    assert b.provider == "OpenVINO-CPU"
    for pa, pb in zip(a, b.predict(images)):
        assert pa.label == pb.label
        np.testing.assert_allclose(list(pb.probabilities.values()), list(pa.probabilities.values()), atol=1e-4)


@needs_openvino
def test_extract_on_openvino_records_the_runtime(extractor, tmp_path):
    from convcache.extract.runner import ExtractConfig, run_extract
    from convcache.store import FeatureStore

    data = make_dataset(tmp_path / "data", splits={"train": 2})
    s = run_extract(ExtractConfig(model=str(extractor), data=str(data), output=str(tmp_path / "f.zarr"),
                                  device="openvino", progress=False))
    assert s.provider == "OpenVINO-CPU"
    assert FeatureStore(tmp_path / "f.zarr").runs("train")[-1]["provider"] == "OpenVINO-CPU"


def test_openvino_missing_is_one_clear_line(extractor, tmp_path):
    """Where OpenVINO is absent (simulated by blocking its import), --device openvino says what to install."""
    code = ("import sys; sys.modules['openvino'] = None; from convcache.cli import main; "
            f"sys.exit(main(['extract', '--model', {str(extractor)!r}, '--data', {str(tmp_path)!r}, "
            f"'-o', {str(tmp_path / 'x.zarr')!r}, '--device', 'openvino']))")
    make_dataset(tmp_path / "train", splits={"train": 1})
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 2 and "convcache[openvino]" in r.stderr and "Traceback" not in r.stderr


def test_runtime_report_names_the_active_build():
    r = run_cli("info", "--runtime", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads(r.stdout)
    assert rep["onnxruntime_distributions"] == {"onnxruntime": rep["onnxruntime"]}
    assert "CPUExecutionProvider" in rep["providers"] and rep["problems"] == []
    assert rep["auto"] == ("openvino" if rep["openvino"] else "cpu")
