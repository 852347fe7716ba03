"""ONNX metadata and identity: how stages describe their artifacts to each other."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import onnx

from convcache.errors import ConvcacheError

PREFIX = "convcache."


def set_metadata(model: onnx.ModelProto, meta: dict) -> None:
    """Store each key as a JSON value under a `convcache.` prefix (replacing older values)."""
    keep = [p for p in model.metadata_props if not p.key.removeprefix(PREFIX) in meta]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in meta.items():
        prop = model.metadata_props.add()
        prop.key, prop.value = PREFIX + key, json.dumps(value, sort_keys=True)


def get_metadata(model: onnx.ModelProto) -> dict:
    out = {}
    for prop in model.metadata_props:
        if prop.key.startswith(PREFIX):
            out[prop.key[len(PREFIX):]] = json.loads(prop.value)
    return out


def graph_sha256(model: onnx.ModelProto) -> str:
    """Identity of what a model computes: its graph, without the metadata (which holds a timestamp)."""
    return hashlib.sha256(model.graph.SerializeToString(deterministic=True)).hexdigest()


def load_model(path: str | os.PathLike, load_weights: bool = True) -> onnx.ModelProto:
    path = Path(path)
    if not path.is_file():
        raise ConvcacheError(f"model not found: {path}")
    try:
        return onnx.load(str(path), load_external_data=load_weights)
    except Exception as exc:  # onnx raises DecodeError and others for non-ONNX files
        raise ConvcacheError(f"not a readable ONNX model: {path} ({exc.__class__.__name__})") from None


def read_metadata(path: str | os.PathLike) -> dict:
    return get_metadata(load_model(path))


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
