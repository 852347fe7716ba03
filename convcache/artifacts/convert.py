"""Conversion into ONNX artifacts: from Keras (tf2onnx), from linear and dense heads' weights, renaming a
graph's inputs/outputs, and checking a converted model against what it was converted from.

Opset policy: a head is converted at its extractor's opset (recorded in the extractor's metadata and the
feature store), so that fusion joins one opset (`convcache.artifacts.compose`). The project's own heads use
the default domain only.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from convcache.errors import ConvcacheError

DEFAULT_OPSET = 17


def keras_to_onnx(model, input_name: str, input_shape: tuple, output_name, opset: int) -> onnx.ModelProto:
    """A single-input Keras model -> ONNX with the given tensor names (`output_name`: one name, or a list with
    one name per output, in the model's order)."""
    from convcache.tfquiet import import_keras

    tf, _ = import_keras()
    import tf2onnx

    spec = [tf.TensorSpec((None, *input_shape), tf.float32, name=input_name)]
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=opset)
    names = [output_name] if isinstance(output_name, str) else list(output_name)
    if len(names) != len(proto.graph.output):
        raise ConvcacheError(f"the converted model has {len(proto.graph.output)} outputs, not {len(names)}")
    rename_io(proto, {proto.graph.input[0].name: input_name},
              {out.name: name for out, name in zip(proto.graph.output, names)})
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
