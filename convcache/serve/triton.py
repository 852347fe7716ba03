"""A Triton Inference Server model repository for a fused model: `DIR/<name>/1/model.onnx`,
`DIR/<name>/config.pbtxt` and `DIR/<name>/labels.txt`, for Triton's `onnxruntime` backend (`openvino`
optional) or its `python` backend (`1/model.py`, from convcache.serve.triton_python_model: ONNX Runtime
inside Triton's python stub, for the tritonserver that PyPI's `nvidia-pytriton` ships).

The config states what the graph states: input and output names, datatypes and dims (the batch axis
left to `max_batch_size`), plus dynamic batching, one instance group per device, the classification
extension's labels file on the probabilities output, and a warm-up request of zeros. The tests parse the
config with Triton's own schema (`tritonclient`'s `model_config_pb2`) and start a real `tritonserver` on
the python-backend repository."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from convcache import artifacts
from convcache.errors import ConvcacheError

BACKENDS = ("onnxruntime", "openvino", "python")

LABELS = "labels.txt"  # Triton's classification extension: one class name a line, in the output's order
DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "uint8": "TYPE_UINT8", "int64": "TYPE_INT64"}


def _dims(tensor: dict, where: str) -> list[int]:
    shape = tensor["shape"][1:]  # the batch axis is Triton's (max_batch_size)
    if any(not isinstance(d, int) or d <= 0 for d in shape):
        raise ConvcacheError(f"{where}: '{tensor['name']}' has no fixed shape after the batch axis ({shape})")
    return shape


def config_dict(model: str, name: str, max_batch: int = 32, preferred: tuple = (8, 32), delay_us: int = 5000,
                backend: str = "onnxruntime", devices: tuple = ("cpu",), instances: int = 1,
                repository: bool = False, threads: int | None = None) -> dict:
    """The fused model at `model` (read and checked as a fused convcache artifact) as Triton's model
    configuration, in the JSON form Triton's model-configuration extension answers
    (`GET /v2/models/{m}/config`); `to_pbtxt` writes the same configuration as config.pbtxt.

    `repository`: the configuration of a written repository, which adds what only a repository has: the
    labels file (`label_filename` on the output with one value per class) and a warm-up request of zeros
    at batch size 1 (Triton runs it before the model reports ready)."""
    fused = artifacts.read(model, artifacts.KIND_FUSED)
    info = artifacts.describe(model)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ConvcacheError(f"--name {name!r}: letters, digits, '_', '.', '-' only (a directory name)")
    if max_batch < 1 or any(p < 1 or p > max_batch for p in preferred):
        raise ConvcacheError("--max-batch must be >= 1 and each preferred batch size within 1..--max-batch")
    if backend not in BACKENDS:
        raise ConvcacheError(f"--backend {backend!r}: one of {', '.join(BACKENDS)}")
    if threads is not None and threads < 1:
        raise ConvcacheError(f"--threads {threads}: must be at least 1")

    def tensor(t, role):
        if t["dtype"] not in DTYPES:
            raise ConvcacheError(f"{model}: {role} '{t['name']}' has dtype {t['dtype']}, not one Triton takes here")
        return {"name": t["name"], "data_type": DTYPES[t["dtype"]], "dims": _dims(t, model)}

    kinds = {"cpu": "KIND_CPU", "gpu": "KIND_GPU"}
    inputs = [tensor(t, "input") for t in info["inputs"]]
    outputs = [tensor(t, "output") for t in info["outputs"]]
    config = {"name": name, "backend": backend, "max_batch_size": max_batch, "input": inputs, "output": outputs,
              "dynamic_batching": {"preferred_batch_size": list(preferred), "max_queue_delay_microseconds": delay_us},
              "instance_group": [{"count": instances, "kind": kinds[d]} for d in devices],
              "parameters": {"convcache_model_id": {"string_value": fused.identity},
                             "convcache_classes": {"string_value": json.dumps(list(fused.classes))}}}
    if threads is not None:
        config["parameters"]["intra_op_threads"] = {"string_value": str(threads)}
    if repository:
        for t in outputs:
            if t["dims"] == [len(fused.classes)] and t["name"] == artifacts.PROBABILITIES:
                t["label_filename"] = LABELS
        config["model_warmup"] = [{"name": "zeros", "batch_size": 1, "inputs": {
            t["name"]: {"data_type": t["data_type"], "dims": t["dims"], "zero_data": True} for t in inputs}}]
    return config


# the fields whose values are protobuf enums (written bare in text format, quoted in JSON)
_ENUMS = {"data_type", "kind"}
# map<string, ...> fields: written as key/value entries
_MAPS = {"parameters", "inputs"}


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
        if key in _MAPS:  # map<string, message>: one entry per key
            return "".join(f"{pad}{key} {{\n{pad}  key: {json.dumps(k)}\n{pad}  value: "
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
    """DIR/<name>/1/model.onnx (and 1/model.py for the python backend), DIR/<name>/labels.txt and
    DIR/<name>/config.pbtxt, the config last (a folder without it is not a model to Triton); returns the
    model's folder."""
    name = name or Path(model).stem
    config = config_dict(model, name, repository=True, **options)
    classes = artifacts.read(model, artifacts.KIND_FUSED).classes
    folder = Path(output) / name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model, folder / "1" / "model.onnx")
    script = folder / "1" / "model.py"
    if config["backend"] == "python":
        shutil.copyfile(Path(__file__).with_name("triton_python_model.py"), script)
    elif script.exists():  # a repository rewritten for another backend keeps no stale script
        script.unlink()
    _write(folder / LABELS, "".join(f"{c}\n" for c in classes))
    _write(folder / "config.pbtxt", to_pbtxt(config))
    return folder


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
