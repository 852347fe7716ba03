"""ONNX conversion and graph surgery in one place: from Keras (tf2onnx), from scikit-learn (skl2onnx),
renaming a graph's inputs/outputs, checking a converted model against what it was converted from,
and joining an extractor and a head with `onnx.compose` under one opset policy.

Opset policy: a head is converted at its extractor's opset (recorded in the extractor's metadata
and the feature store), so that fusion joins one opset; if a head arrives with another opset of
the default domain, `join` converts it with `onnx.version_converter` and fails clearly when that is
not possible. The project's own heads use the default domain only (`linear_to_onnx`, tf2onnx for the
dense head); other domains a model brings are kept as they are, and domains nobody uses are dropped.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import compose, helper

from convcache.errors import ConvcacheError

DEFAULT_OPSET = 17


def keras_to_onnx(model, input_name: str, input_shape: tuple, output_name: str, opset: int) -> onnx.ModelProto:
    """A single-input, single-output Keras model -> ONNX with the given tensor names."""
    from convcache.tfquiet import import_keras

    tf, _ = import_keras()
    import tf2onnx

    spec = [tf.TensorSpec((None, *input_shape), tf.float32, name=input_name)]
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=opset)
    rename_io(proto, {proto.graph.input[0].name: input_name}, {proto.graph.output[0].name: output_name})
    return proto


def _probabilities(z: str, k: int, output_name: str, normalization: str, prefix: str) -> tuple[list, list]:
    """Nodes (and initialisers) from logits `z` with `k` columns to class probabilities: binary (k = 1)
    [1 - s, s] with s = sigmoid(z), as Keras' sigmoid head and scikit-learn's binary classifiers; else
    softmax(z) (`normalization="softmax"`) or one-vs-rest sigmoids normalised to sum 1 (`"ovr"`)."""
    from onnx import numpy_helper

    if k == 1:
        return ([helper.make_node("Sigmoid", [z], [f"{prefix}_p1"]),
                 helper.make_node("Sub", [f"{prefix}_one", f"{prefix}_p1"], [f"{prefix}_p0"]),
                 helper.make_node("Concat", [f"{prefix}_p0", f"{prefix}_p1"], [output_name], axis=1)],
                [numpy_helper.from_array(np.ones((1, 1), np.float32), f"{prefix}_one")])
    if normalization == "softmax":
        return [helper.make_node("Softmax", [z], [output_name], axis=1)], []
    return ([helper.make_node("Sigmoid", [z], [f"{prefix}_s"]),
             helper.make_node("ReduceSum", [f"{prefix}_s", f"{prefix}_axis"], [f"{prefix}_sum"], keepdims=1),
             helper.make_node("Div", [f"{prefix}_s", f"{prefix}_sum"], [output_name])],
            [numpy_helper.from_array(np.array([1], np.int64), f"{prefix}_axis")])


def _model(nodes, inits, name: str, input_name: str, n_in: int, output_name: str, k: int, opset: int):
    from onnx import TensorProto

    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [None, n_in])],
                              [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [None, max(2, k)])],
                              inits)
    opsets = [helper.make_opsetid("", opset)]
    return helper.make_model(graph, opset_imports=opsets, producer_name="convcache",
                             ir_version=helper.find_min_ir_version_for(opsets))


def linear_to_onnx(scaler, model, input_name: str, output_name: str, opset: int,
                   normalization: str = "softmax") -> onnx.ModelProto:
    """StandardScaler + a linear classifier (coef_, intercept_) -> ONNX in the default domain only
    (MatMul, Add, Sigmoid or Softmax): the scaler is folded into the weights, so the head runs on every
    runtime (OpenVINO and TensorRT have no `ai.onnx.ml` ops). Probabilities as scikit-learn computes
    them (`_probabilities`: softmax for LogisticRegression, "ovr" for SGDClassifier)."""
    from onnx import numpy_helper

    coef = np.asarray(model.coef_, np.float64)  # (k, n): k = 1 for two classes
    intercept = np.asarray(model.intercept_, np.float64)
    mean = np.zeros(coef.shape[1]) if getattr(scaler, "mean_", None) is None else scaler.mean_
    scale = np.ones(coef.shape[1]) if getattr(scaler, "scale_", None) is None else scaler.scale_
    weights = (coef / scale).T  # x' = (x - mean) / scale  =>  z = x W' + (b - (mean / scale) coef^T)
    bias = intercept - (mean / scale) @ coef.T
    inits = [numpy_helper.from_array(weights.astype(np.float32), "linear_W"),
             numpy_helper.from_array(bias.astype(np.float32), "linear_b")]
    nodes = [helper.make_node("MatMul", [input_name, "linear_W"], ["linear_zw"]),
             helper.make_node("Add", ["linear_zw", "linear_b"], ["linear_z"])]
    tail, tail_inits = _probabilities("linear_z", coef.shape[0], output_name, normalization, "linear")
    return _model(nodes + tail, inits + tail_inits, "convcache_linear_head", input_name, coef.shape[1],
                  output_name, coef.shape[0], opset)


def dense_to_onnx(hidden: tuple, out: tuple, input_name: str, output_name: str, opset: int) -> onnx.ModelProto:
    """The book's dense head, inference only (dropout is the identity): relu(x W1 + b1) W2 + b2, then
    sigmoid (one output unit: two-column probabilities, as Keras' binary head) or softmax. Written with
    onnx.helper from the trained weights: no TensorFlow converter, default-domain ops only."""
    from onnx import numpy_helper

    (w1, b1), (w2, b2) = hidden, out
    inits = [numpy_helper.from_array(np.asarray(v, np.float32), name)
             for v, name in ((w1, "dense_W1"), (b1, "dense_b1"), (w2, "dense_W2"), (b2, "dense_b2"))]
    nodes = [helper.make_node("MatMul", [input_name, "dense_W1"], ["dense_h0"]),
             helper.make_node("Add", ["dense_h0", "dense_b1"], ["dense_h1"]),
             helper.make_node("Relu", ["dense_h1"], ["dense_h"]),
             helper.make_node("MatMul", ["dense_h", "dense_W2"], ["dense_z0"]),
             helper.make_node("Add", ["dense_z0", "dense_b2"], ["dense_z"])]
    k = np.asarray(w2).shape[1]
    tail, tail_inits = _probabilities("dense_z", k, output_name, "softmax", "dense")
    return _model(nodes + tail, inits + tail_inits, "convcache_dense_head", input_name, np.asarray(w1).shape[0],
                  output_name, k, opset)


def rename_io(proto: onnx.ModelProto, inputs: dict, outputs: dict) -> None:
    """Rename graph inputs/outputs (old -> new) everywhere they are referenced."""
    renames = {**inputs, **outputs}
    for node in proto.graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
    for v in list(proto.graph.input) + list(proto.graph.output):
        v.name = renames.get(v.name, v.name)


def session(proto: onnx.ModelProto):
    import onnxruntime as ort

    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def check_parity(proto: onnx.ModelProto, reference: np.ndarray, feeds: dict, output: str, bound: float,
                 what: str = "ONNX model") -> float:
    """Run `proto` on `feeds`; fail unless its `output` is within `bound` (max abs) of `reference`."""
    got = session(proto).run([output], feeds)[0]
    reference = np.asarray(reference)
    if got.shape != reference.shape:
        raise ConvcacheError(f"{what}: output shape {got.shape} != reference {reference.shape}")
    diff = float(np.max(np.abs(got - reference)))
    if not diff <= bound:
        raise ConvcacheError(f"{what}: max abs diff {diff:.3g} > bound {bound:.3g}")
    return diff


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
