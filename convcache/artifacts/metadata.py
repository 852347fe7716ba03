"""ONNX metadata and identity: how stages describe their artifacts to each other."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import onnx

from convcache.errors import ConvcacheError

PREFIX = "convcache."


def set_metadata(model: onnx.ModelProto, meta: dict) -> None:
    """Store each key as a JSON value under a `convcache.` prefix (replacing older values)."""
    keep = [p for p in model.metadata_props if p.key.removeprefix(PREFIX) not in meta]
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
    """Identity of what a model computes, independent of the names converters generate.

    A Merkle hash over the graph: each graph input is its position, dtype and shape; each
    initializer its dtype, dims and bytes; each node output the hash of (domain, op type, attributes,
    the hashes of its inputs, output position). The identity hashes the opset imports and the graph
    outputs' hashes in order. Node names, tensor names, node order and metadata do not enter it,
    so exporting the same network twice (in one process or two) gives the same identity.
    """
    graph = model.graph
    token: dict[str, str] = {"": "-"}  # "" marks an omitted optional input
    for name, value in _initializer_tokens(graph).items():
        token[name] = value
    for i, inp in enumerate(graph.input):
        if inp.name not in token:
            token[inp.name] = _h("input", i, _type_repr(inp.type))
    pending = list(graph.node)
    while pending:  # ONNX requires topological order; tolerate any order anyway
        rest = []
        for node in pending:
            if not all(i in token for i in node.input):
                rest.append(node)
                continue
            body = _h(node.domain or "ai.onnx", node.op_type, sorted(_attr_repr(a) for a in node.attribute),
                      [token[i] for i in node.input])
            for j, out in enumerate(node.output):
                token[out] = _h(body, j)
        if len(rest) == len(pending):
            raise ConvcacheError("the ONNX graph has a node whose inputs are never produced")
        pending = rest
    opsets = sorted((o.domain or "ai.onnx", o.version) for o in model.opset_import)
    return _h("convcache-identity/1", opsets, [token.get(o.name, o.name) for o in graph.output])


def _h(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _tensor_token(t: onnx.TensorProto) -> str:
    from onnx import numpy_helper

    arr = numpy_helper.to_array(t)
    return _h("tensor", str(arr.dtype), list(arr.shape), hashlib.sha256(arr.tobytes()).hexdigest())


def _initializer_tokens(graph) -> dict:
    return {t.name: _tensor_token(t) for t in graph.initializer}


def _type_repr(tp) -> str:
    if tp.HasField("tensor_type"):
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tp.tensor_type.shape.dim]
        return f"tensor({tp.tensor_type.elem_type}){dims}"
    return tp.WhichOneof("value") or "?"


def _attr_repr(a: onnx.AttributeProto) -> str:
    if a.type == onnx.AttributeProto.TENSOR:
        return _h(a.name, _tensor_token(a.t))
    if a.type == onnx.AttributeProto.TENSORS:
        return _h(a.name, [_tensor_token(t) for t in a.tensors])
    if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
        return _h(a.name, [graph_sha256(onnx.helper.make_model(g)) for g in graphs])
    value = onnx.helper.get_attribute_value(a)
    if isinstance(value, bytes):
        value = value.hex()
    elif isinstance(value, list):
        value = [v.hex() if isinstance(v, bytes) else v for v in value]
    return _h(a.name, value)


def load_model(path: str | os.PathLike, load_weights: bool = True) -> onnx.ModelProto:
    path = Path(path)
    if not path.is_file():
        raise ConvcacheError(f"model not found: {path}")
    try:
        proto = onnx.load(str(path), load_external_data=load_weights)
    except Exception as exc:  # onnx raises DecodeError and others for non-ONNX files
        raise ConvcacheError(f"not a readable ONNX model: {path} ({exc.__class__.__name__})") from None
    check_initializers(proto, str(path))
    return proto


def check_initializers(proto: onnx.ModelProto, where: str) -> None:
    """Every initializer holds the data its dims declare: a tensor declaring 64 GiB over a few KB of bytes is a
    one-line error here, before anything sizes a buffer by its dims."""
    from onnx import TensorProto, helper

    for graph in [proto.graph, *(a.g for n in proto.graph.node for a in n.attribute if a.type == a.GRAPH)]:
        for t in graph.initializer:
            if t.data_location == TensorProto.EXTERNAL:
                continue
            declared = int(np.prod([int(d) for d in t.dims], dtype=object)) if len(t.dims) else 1
            if t.HasField("raw_data"):
                try:
                    itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
                except Exception:
                    continue  # an exotic type (strings, 4-bit): ONNX Runtime checks it
                held, unit = len(t.raw_data), itemsize
            else:
                field = {TensorProto.FLOAT: "float_data", TensorProto.DOUBLE: "double_data",
                         TensorProto.INT64: "int64_data", TensorProto.UINT64: "uint64_data",
                         TensorProto.STRING: "string_data"}.get(t.data_type, "int32_data")
                held, unit = len(getattr(t, field)), 1
                if t.data_type in (TensorProto.COMPLEX64, TensorProto.COMPLEX128):
                    unit = 2
            if declared * unit != held:
                raise ConvcacheError(f"{where}: initializer {t.name!r} declares dims {list(t.dims)} "
                                     f"({declared:,} values) but holds {held // max(unit, 1):,}: a malformed model")
