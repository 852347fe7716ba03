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


def config_dict(model: str, name: str, max_batch: int = 32, preferred: tuple = (8, 32), delay_us: int = 5000,
                backend: str = "onnxruntime", devices: tuple = ("cpu",), instances: int = 1) -> dict:
    """The fused model at `model` (read and checked as a fused convcache artifact) as Triton's model
    configuration, in the JSON form Triton's model-configuration extension answers
    (`GET /v2/models/{m}/config`); `to_pbtxt` writes the same configuration as config.pbtxt."""
    fused = artifacts.read(model, artifacts.KIND_FUSED)
    info = artifacts.describe(model)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ConvcacheError(f"--name {name!r}: letters, digits, '_', '.', '-' only (a directory name)")
    if max_batch < 1 or any(p < 1 or p > max_batch for p in preferred):
        raise ConvcacheError("--max-batch must be >= 1 and each preferred batch size within 1..--max-batch")

    def tensor(t, role):
        if t["dtype"] not in DTYPES:
            raise ConvcacheError(f"{model}: {role} '{t['name']}' has dtype {t['dtype']}, not one Triton takes here")
        return {"name": t["name"], "data_type": DTYPES[t["dtype"]], "dims": _dims(t, model)}

    kinds = {"cpu": "KIND_CPU", "gpu": "KIND_GPU"}
    return {"name": name, "backend": backend, "max_batch_size": max_batch,
            "input": [tensor(t, "input") for t in info["inputs"]],
            "output": [tensor(t, "output") for t in info["outputs"]],
            "dynamic_batching": {"preferred_batch_size": list(preferred), "max_queue_delay_microseconds": delay_us},
            "instance_group": [{"count": instances, "kind": kinds[d]} for d in devices],
            "parameters": {"convcache_model_id": {"string_value": fused.identity},
                           "convcache_classes": {"string_value": json.dumps(list(fused.classes))}}}


# the fields whose values are protobuf enums (written bare in text format, quoted in JSON)
_ENUMS = {"data_type", "kind"}


def to_pbtxt(config: dict) -> str:
    """A configuration from `config_dict` in protobuf text format (config.pbtxt): messages as blocks,
    repeated fields as lists, maps (`parameters`) as key/value entries."""

    def value(key, v, indent):
        pad = "  " * indent
        if isinstance(v, dict):
            return "{\n" + "".join(field(k, x, indent + 1) for k, x in v.items()) + pad + "}"
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return v if key in _ENUMS else json.dumps(v)
        return str(v)

    def field(key, v, indent):
        pad = "  " * indent
        if key == "parameters":  # map<string, ModelParameter>: one entry per key
            return "".join(f"{pad}parameters {{\n{pad}  key: {json.dumps(k)}\n{pad}  value: "
                           f"{value('value', x, indent + 1)}\n{pad}}}\n" for k, x in v.items())
        if isinstance(v, list):
            if v and isinstance(v[0], dict):
                return f"{pad}{key} [\n" + ",\n".join(f"{pad}  " + value(key, x, indent + 1) for x in v) \
                    + f"\n{pad}]\n"
            return f"{pad}{key}: [ {', '.join(value(key, x, indent) for x in v)} ]\n"
        if isinstance(v, dict):
            return f"{pad}{key} {value(key, v, indent)}\n"
        return f"{pad}{key}: {value(key, v, indent)}\n"

    return "".join(field(k, v, 0) for k, v in config.items())


def model_config(model: str, name: str, **options) -> str:
    """config.pbtxt for the fused model at `model` (see `config_dict` for the options)."""
    return to_pbtxt(config_dict(model, name, **options))


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
