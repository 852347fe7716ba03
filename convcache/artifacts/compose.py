"""Graph surgery on artifacts: joining an extractor and a head with `onnx.compose` under one opset policy,
and folding the extractor's channel permutation.

Opset policy: if a head arrives with another opset of the default domain than its extractor, `join` converts
it with `onnx.version_converter` and fails clearly when that is not possible. Other domains a model brings
are kept as they are, and domains nobody uses are dropped.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import compose, helper

from convcache.artifacts.convert import rename_io
from convcache.errors import ConvcacheError


def _default_opset(proto: onnx.ModelProto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def join(extractor: onnx.ModelProto, head: onnx.ModelProto, features: str, head_input: str,
         probabilities: str) -> onnx.ModelProto:
    """extractor (images -> features map) + Flatten + head (flat features -> probabilities), or without the
    Flatten for a head that takes the map (a trainable top + head), as one graph
    with outputs `probabilities` and `features`, joined by `onnx.compose.merge_models`."""
    target = _default_opset(extractor)
    if _default_opset(head) != target:
        try:
            head = onnx.version_converter.convert_version(head, target)
        except Exception as exc:
            raise ConvcacheError(f"the head uses opset {_default_opset(head)}, the extractor {target}, and the "
                                 f"head cannot be converted ({exc.__class__.__name__}: {exc}); retrain the head "
                                 "on a store from this extractor") from None
    ext = onnx.ModelProto()
    ext.CopyFrom(extractor)
    rank = {i.name: len(i.type.tensor_type.shape.dim) for i in head.graph.input}.get(head_input, 2)
    if rank > 2:  # a head that takes the feature map itself (a trainable top): no Flatten in between
        flat = features
    else:
        flat = "convcache_flat_features"
        ext.graph.node.append(helper.make_node("Flatten", [features], [flat], axis=1, name="flatten_features"))
        ext.graph.output.append(helper.make_tensor_value_info(flat, onnx.TensorProto.FLOAT, None))
    # converters declare domains they never use (tf2onnx: ai.onnx.ml): keep only what some node uses
    used = {n.domain for n in ext.graph.node} | {n.domain for n in head.graph.node}
    for m in (ext, head):
        keep = [o for o in m.opset_import if o.domain in ("", "ai.onnx") or o.domain in used]
        del m.opset_import[:]
        m.opset_import.extend(keep)
    head = compose.add_prefix(head, "head/")
    for m in (ext, head):  # the fused model gets metadata of its own
        del m.metadata_props[:]
    ir = max(ext.ir_version, head.ir_version)
    ext.ir_version = head.ir_version = ir
    try:
        fused = compose.merge_models(ext, head, io_map=[(flat, "head/" + head_input)],
                                     outputs=["head/" + probabilities, features], prefix1="", prefix2="",
                                     name="convcache_fused", producer_name="convcache")
    except ValueError as exc:
        raise ConvcacheError(f"cannot join extractor and head: {exc}") from None
    rename_io(fused, {}, {"head/" + probabilities: probabilities})
    onnx.checker.check_model(fused, full_check=True)
    return fused


def fold_channel_permutation(proto: onnx.ModelProto) -> bool:
    """Fold an input channel permutation (RGB->BGR, converted from a matmul with a permutation
    matrix: Shape/Cast/Reshape/Gather/Concat/MatMul/Reshape) followed by a per-channel mean `Sub`,
    a Transpose and the first Conv, into: Sub(mean in input order) -> Transpose -> Conv whose
    input-channel weights are permuted. The mean is still subtracted before the Conv pads, so the
    borders stay exact; only the order of the Conv's channel sum changes. In place; returns False
    (graph untouched) when the pattern is not there."""
    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    producer = {o: n for n in g.node for o in n.output}

    def only(name, op):
        users = consumers.get(name, [])
        return users[0] if len(users) == 1 and users[0].op_type == op else None

    matmul = next((n for n in g.node if n.op_type == "MatMul" and n.input[1] in inits
                   and onnx.numpy_helper.to_array(inits[n.input[1]]).shape == (3, 3)), None)
    if matmul is None:
        return False
    perm_matrix = onnx.numpy_helper.to_array(inits[matmul.input[1]])
    if not (np.isin(perm_matrix, (0, 1)).all() and (perm_matrix.sum(0) == 1).all() and (perm_matrix.sum(1) == 1).all()):
        return False
    # the path from the graph input to the MatMul, and the Reshape back to NHWC after it
    flat_in = producer.get(matmul.input[0])
    back = only(matmul.output[0], "Reshape")
    sub = back is not None and only(back.output[0], "Sub")
    transpose = sub and only(sub.output[0], "Transpose")
    conv = transpose and only(transpose.output[0], "Conv")
    image = g.input[0].name
    if not (flat_in is not None and flat_in.op_type == "Reshape" and flat_in.input[0] == image and conv
            and sub.input[1] in inits and conv.input[1] in inits
            and list(next(a.ints for a in transpose.attribute if a.name == "perm")) == [0, 3, 1, 2]):
        return False
    mean = onnx.numpy_helper.to_array(inits[sub.input[1]])
    if mean.shape != (3,):
        return False
    # y[..., j] = x[..., p[j]] - mean[j]  ==  (x - mean_in)[..., p[j]] with mean_in[p[j]] = mean[j]
    p = perm_matrix.argmax(0)
    mean_in = np.empty(3, np.float32)
    mean_in[p] = mean
    weights = onnx.numpy_helper.to_array(inits[conv.input[1]])  # O x C x kh x kw over y's channels
    folded = np.empty_like(weights)
    folded[:, p] = weights  # channel p[j] of x carries what channel j of y carried
    inits[sub.input[1]].CopyFrom(onnx.numpy_helper.from_array(mean_in, sub.input[1]))
    inits[conv.input[1]].CopyFrom(onnx.numpy_helper.from_array(folded, conv.input[1]))
    sub.input[0] = image
    _prune(g)  # the permutation's nodes no longer lead to an output
    return True


def _prune(g: onnx.GraphProto) -> None:
    """Drop nodes no graph output depends on, then initializers and value_info nothing uses."""
    producer = {o: n for n in g.node for o in n.output}
    needed, stack = set(), [o.name for o in g.output]
    while stack:
        n = producer.get(stack.pop())
        if n is not None and id(n) not in needed:
            needed.add(id(n))
            stack.extend(n.input)
    keep = [n for n in g.node if id(n) in needed]
    used = {i for n in keep for i in n.input} | {o for n in keep for o in n.output}
    for field, items in (("node", keep), ("initializer", [t for t in g.initializer if t.name in used]),
                         ("value_info", [v for v in g.value_info if v.name in used])):
        del getattr(g, field)[:]
        getattr(g, field).extend(items)


def select_outputs(extractor: onnx.ModelProto, names: list, output: str, width: int) -> onnx.ModelProto:
    """A tapped extractor cut down to the taps `names`: each flattened, concatenated in that order as `output`
    (`width` features; one tap: just flattened), every other output and the nodes only they need removed (a
    block4 model does not run block5)."""
    missing = [n for n in names if n not in {o.name for o in extractor.graph.output}]
    if missing:
        raise ConvcacheError(f"the extractor has no output {missing[0]!r} (has: "
                             f"{', '.join(o.name for o in extractor.graph.output)})")
    model = onnx.ModelProto()
    model.CopyFrom(extractor)
    flat = []
    for name in names:
        model.graph.node.append(helper.make_node("Flatten", [name], [f"{name}/flat"], axis=1, name=f"flatten_{name}"))
        flat.append(f"{name}/flat")
    if len(flat) > 1:
        model.graph.node.append(helper.make_node("Concat", flat, [output], axis=1, name="concat_taps"))
    else:
        model.graph.node.append(helper.make_node("Identity", flat, [output], name="tap_output"))
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, [None, width]))
    _prune(model.graph)
    return model
