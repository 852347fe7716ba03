"""ONNX conversion and graph surgery in one place: from Keras (tf2onnx), from scikit-learn (skl2onnx),
renaming a graph's inputs/outputs, checking a converted model against what it was converted from,
and joining an extractor and a head with `onnx.compose` under one opset policy.

Opset policy: a head is converted at its extractor's opset (recorded in the extractor's metadata
and the feature store), so that fusion joins one opset; if a head arrives with another opset of
the default domain, `join` converts it with `onnx.version_converter` and fails clearly when that is
not possible. Other domains (e.g. skl2onnx's `ai.onnx.ml`) are kept as they are.
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


def sklearn_to_onnx(estimator, n_features: int, input_name: str, output_name: str, opset: int) -> onnx.ModelProto:
    """A scikit-learn classifier (or pipeline) -> ONNX with one probability output."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    final = estimator.steps[-1][1] if hasattr(estimator, "steps") else estimator
    proto = convert_sklearn(estimator, initial_types=[(input_name, FloatTensorType([None, n_features]))],
                            options={id(final): {"zipmap": False}}, target_opset={"": opset, "ai.onnx.ml": 3})
    probs = [o.name for o in proto.graph.output if "prob" in o.name.lower()]
    if not probs:
        raise ConvcacheError("skl2onnx produced no probability output")
    keep_outputs(proto, [probs[0]])
    rename_io(proto, {}, {probs[0]: output_name})
    return proto


def rename_io(proto: onnx.ModelProto, inputs: dict, outputs: dict) -> None:
    """Rename graph inputs/outputs (old -> new) everywhere they are referenced."""
    renames = {**inputs, **outputs}
    for node in proto.graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
    for v in list(proto.graph.input) + list(proto.graph.output):
        v.name = renames.get(v.name, v.name)


def keep_outputs(proto: onnx.ModelProto, names: list[str]) -> None:
    keep = [o for o in proto.graph.output if o.name in names]
    del proto.graph.output[:]
    proto.graph.output.extend(keep)


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
    # converters declare domains they never use (tf2onnx: ai.onnx.ml 2); drop those when the head needs another
    used = {n.domain for n in ext.graph.node}
    head_ops = {o.domain: o.version for o in head.opset_import}
    keep = [o for o in ext.opset_import if o.domain in ("", "ai.onnx") or o.domain in used
            or head_ops.get(o.domain, o.version) == o.version]
    del ext.opset_import[:]
    ext.opset_import.extend(keep)
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
