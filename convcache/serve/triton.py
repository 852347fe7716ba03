"""A Triton Inference Server model repository for a fused model: `DIR/<name>/1/model.onnx` and
`DIR/<name>/config.pbtxt` for Triton's `onnxruntime` backend (the `openvino` backend optional).

The config states what the graph states: input and output names, datatypes and dims (the batch axis
left to `max_batch_size`), plus dynamic batching and one instance group per device. Nothing here runs
Triton; the test parses the config with Triton's own schema (`tritonclient`'s `model_config_pb2`) and
checks it against the ONNX graph."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from convcache import artifacts
from convcache.errors import ConvcacheError

DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "uint8": "TYPE_UINT8", "int64": "TYPE_INT64"}


def _dims(tensor: dict, where: str) -> list[int]:
    shape = tensor["shape"][1:]  # the batch axis is Triton's (max_batch_size)
    if any(not isinstance(d, int) or d <= 0 for d in shape):
        raise ConvcacheError(f"{where}: '{tensor['name']}' has no fixed shape after the batch axis ({shape})")
    return shape


def model_config(model: str, name: str, max_batch: int = 32, preferred: tuple = (8, 32), delay_us: int = 5000,
                 backend: str = "onnxruntime", devices: tuple = ("cpu",), instances: int = 1) -> str:
    """config.pbtxt for the fused model at `model` (read and checked as a fused convcache artifact)."""
    fused = artifacts.read(model, artifacts.KIND_FUSED)
    info = artifacts.describe(model)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ConvcacheError(f"--name {name!r}: letters, digits, '_', '.', '-' only (a directory name)")
    if max_batch < 1 or any(p < 1 or p > max_batch for p in preferred):
        raise ConvcacheError("--max-batch must be >= 1 and each preferred batch size within 1..--max-batch")

    def tensor(t, role):
        if t["dtype"] not in DTYPES:
            raise ConvcacheError(f"{model}: {role} '{t['name']}' has dtype {t['dtype']}, not one Triton takes here")
        dims = ", ".join(map(str, _dims(t, model)))
        return f'  {{\n    name: "{t["name"]}"\n    data_type: {DTYPES[t["dtype"]]}\n    dims: [ {dims} ]\n  }}'

    inputs = ",\n".join(tensor(t, "input") for t in info["inputs"])
    outputs = ",\n".join(tensor(t, "output") for t in info["outputs"])
    kinds = {"cpu": "KIND_CPU", "gpu": "KIND_GPU"}
    groups = ",\n".join(f"  {{\n    count: {instances}\n    kind: {kinds[d]}\n  }}" for d in devices)
    return (f'name: "{name}"\nbackend: "{backend}"\nmax_batch_size: {max_batch}\n'
            f"input [\n{inputs}\n]\noutput [\n{outputs}\n]\n"
            f"dynamic_batching {{\n  preferred_batch_size: [ {', '.join(map(str, preferred))} ]\n"
            f"  max_queue_delay_microseconds: {delay_us}\n}}\n"
            f"instance_group [\n{groups}\n]\n"
            + _parameter("convcache_model_id", fused.identity)
            + _parameter("convcache_classes", json.dumps(list(fused.classes))))


def _parameter(key: str, value: str) -> str:
    return f"parameters {{\n  key: {json.dumps(key)}\n  value: {{ string_value: {json.dumps(value)} }}\n}}\n"


def write_repository(model: str, output: str, name: str | None = None, **options) -> Path:
    """DIR/<name>/1/model.onnx and DIR/<name>/config.pbtxt; returns the model's folder."""
    name = name or Path(model).stem
    config = model_config(model, name, **options)
    folder = Path(output) / name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model, folder / "1" / "model.onnx")
    tmp = folder / "config.pbtxt.tmp"
    tmp.write_text(config)
    tmp.replace(folder / "config.pbtxt")
    return folder
