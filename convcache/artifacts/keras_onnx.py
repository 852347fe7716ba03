"""Keras -> ONNX without a graph converter, for the layers VGG16's conv base is made of (the extractor, and the
block5 top `train --train-top` fine-tunes): one ONNX node (or two) per Keras layer, the weights copied once.

tf2onnx freezes the whole model into a TensorFlow graph and runs optimiser passes over it that copy the
weights pass after pass: an export of VGG16's 58 MB conv base peaks at ~3.4 GiB with it (1.3 GiB written
here: experiments/bench_converter.py), for a graph of 30-odd nodes. The extractor is a chain of six kinds
of layer, so it is written here directly:

- `CaffePreprocess` (RGB->BGR, minus the ImageNet mean): `Sub` of the mean in RGB order, the channel swap
  folded into the first `Conv`'s weights;
- `Rescaling` (scalar scale and offset): `Mul`, `Add`;
- `Conv2D` (channels_last, groups 1, relu or linear, valid or same): `Conv` in NCHW (+ `Relu`), "same" padded
  as TensorFlow pads (any odd pixel at the end);
- `MaxPooling2D` (valid or same): `MaxPool`;
- `GlobalAveragePooling2D` / `GlobalMaxPooling2D`: `GlobalAveragePool` / `GlobalMaxPool`, then `Squeeze`.

Layout: the graph transposes the images to NCHW once, before the first `Conv`, and each unpooled output back
to NHWC, so every output has Keras' shape and element order (what the store's rows and a head's features
are). The graph is `images -> Sub -> Transpose -> Conv -> ...`, the form `artifacts.compose.
fold_channel_permutation` makes of tf2onnx's: node for node the same operators, attributes and weights as
tf2onnx's conversion (explicit pads where it knows the size, an all-zero bias left out, the ai.onnx.ml
import it declares), so the graph identity is the same and stores keyed by it stay valid. Any other layer
raises `Unsupported`; the caller falls back to tf2onnx. Either way export checks the result against Keras
itself (`onnx_target.check_extractor_parity`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

NAME = "convcache.keras_onnx"  # the producer name of a graph written here (`converter_of` reads it)


class Unsupported(Exception):
    """The model has a layer (or a setting of one) this writer does not handle: convert it with tf2onnx."""


@dataclass
class _Value:
    """A tensor in the ONNX graph being built: its name, layout (nhwc, nchw or flat) and, after caffe's
    channel swap, the permutation still to apply (the real tensor's channel j is this one's channel perm[j])."""

    name: str
    layout: str
    perm: tuple | None = None
    # the spatial size, where tf2onnx would know it statically: it pads a "same" Conv with explicit pads there
    # and with auto_pad SAME_UPPER where it does not (after caffe's matmul); both pad alike, and matching it
    # keeps the identity (see `to_onnx`)
    hw: tuple | None = None


class _Writer:
    def __init__(self, input_name: str, fold: bool):
        self.input_name, self.fold = input_name, fold
        self.nodes: list = []
        self.inits: list = []
        self.values: dict = {}  # id(KerasTensor) -> _Value
        self.transposed: dict = {}  # (name, layout) -> _Value: each tensor transposed once at most

    # every name made here is under "keras/" (a layer's activation is "keras/<layer name>"), so that no output
    # name (a tap is named after its layer) can clash with one
    def init(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.array(array, order="C"), f"keras/{name}"))  # 0-d stays 0-d
        return f"keras/{name}"

    def node(self, op: str, inputs: list, output: str, **attrs) -> str:
        output = output if output.startswith("keras/") else f"keras/{output}"
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    # -- layout
    _PERMS = {"nchw": [0, 3, 1, 2], "nhwc": [0, 2, 3, 1]}  # from the other layout to this one

    def nchw(self, v: _Value) -> _Value:
        if v.layout == "flat":
            raise Unsupported(f"a 4-D layer after a flattened tensor ({v.name})")
        return self.layout(v, "nchw")

    def nhwc(self, v: _Value) -> _Value:
        return self.layout(v, "nhwc") if v.layout != "flat" else self.materialise(v)

    def layout(self, v: _Value, layout: str) -> _Value:
        """`v` (its channel order applied) in `layout`: transposed once at most, whoever asks."""
        v = self.materialise(v)
        if v.layout == layout:
            return v
        key = (v.name, layout)
        if key not in self.transposed:
            out = self.node("Transpose", [v.name], f"{v.name}/{layout}", perm=self._PERMS[layout])
            self.transposed[key] = _Value(out, layout, hw=v.hw)
        return self.transposed[key]

    def materialise(self, v: _Value) -> _Value:
        """The permutation applied (a Gather over channels) for a consumer that cannot fold it."""
        if v.perm is None:
            return v
        axis = 3 if v.layout == "nhwc" else 1
        idx = self.init(f"{v.name}/channel_order", np.array(v.perm, np.int64))
        return _Value(self.node("Gather", [v.name, idx], f"{v.name}/permuted", axis=axis), v.layout, hw=v.hw)

    # -- layers
    def layer(self, op, inputs: list) -> _Value:
        kind = type(op).__name__
        if len(inputs) != 1:
            raise Unsupported(f"layer {op.name!r} ({kind}) has {len(inputs)} inputs")
        (x,) = inputs
        cfg = op.get_config()
        if cfg.get("data_format", "channels_last") != "channels_last":
            raise Unsupported(f"layer {op.name!r}: data_format {cfg['data_format']}")
        if kind == "CaffePreprocess":  # y = x[..., ::-1] - mean_bgr == (x - mean_rgb)[..., ::-1]
            from convcache.backbone.keras_model import IMAGENET_BGR_MEAN

            if x.layout != "nhwc" or x.perm is not None:
                raise Unsupported(f"layer {op.name!r} not on the images")
            mean_rgb = np.array(IMAGENET_BGR_MEAN[::-1], np.float32)
            return _Value(self.node("Sub", [x.name, self.init(f"{op.name}/mean_rgb", mean_rgb)], op.name), "nhwc",
                          (2, 1, 0))  # tf2onnx loses the static shape in the matmul it makes of this layer
        if kind == "Rescaling":
            scale, offset = np.asarray(cfg["scale"], np.float32), np.asarray(cfg["offset"], np.float32)
            if scale.size != 1 or offset.size != 1:
                raise Unsupported(f"layer {op.name!r}: a per-channel Rescaling")
            # x * scale + offset, as Keras computes it (and tf2onnx converts it), the Add kept even for offset 0
            out = self.node("Mul", [x.name, self.init(f"{op.name}/scale", scale.reshape(()))], f"{op.name}/scaled")
            out = self.node("Add", [out, self.init(f"{op.name}/offset", offset.reshape(()))], op.name)
            return _Value(out, x.layout, x.perm, x.hw)  # a scalar op commutes with the channel order
        if kind == "Conv2D":
            return self.conv(op, cfg, x)
        if kind == "MaxPooling2D":
            if cfg["padding"] not in ("valid", "same"):
                raise Unsupported(f"layer {op.name!r}: padding {cfg['padding']}")
            x = self.nchw(x)
            kernel, strides = list(cfg["pool_size"]), list(cfg["strides"] or cfg["pool_size"])
            pad = _padding(cfg["padding"], x.hw, kernel, strides, [1, 1])
            return _Value(self.node("MaxPool", [x.name], op.name, kernel_shape=kernel, strides=strides, **pad), "nchw",
                          hw=_out_hw(cfg["padding"], x.hw, kernel, strides, [1, 1]))
        if kind in ("GlobalAveragePooling2D", "GlobalMaxPooling2D"):
            if cfg.get("keepdims"):
                raise Unsupported(f"layer {op.name!r}: keepdims")
            x = self.nchw(x)
            pooled = self.node("GlobalAveragePool" if "Average" in kind else "GlobalMaxPool", [x.name],
                               f"{op.name}/pooled")
            axes = self.init(f"{op.name}/axes", np.array([2, 3], np.int64))
            return _Value(self.node("Squeeze", [pooled, axes], op.name), "flat")
        raise Unsupported(f"layer {op.name!r} of type {kind}")

    def conv(self, op, cfg: dict, x: _Value) -> _Value:
        if cfg["groups"] != 1 or cfg["padding"] not in ("valid", "same") or cfg["activation"] not in ("relu", "linear"):
            raise Unsupported(f"layer {op.name!r}: groups {cfg['groups']}, padding {cfg['padding']}, "
                              f"activation {cfg['activation']}")
        kernel, *bias = op.get_weights()  # kh x kw x cin x cout
        weights = np.transpose(kernel, (3, 2, 0, 1)).astype(np.float32)  # cout x cin x kh x kw
        if x.perm is not None and not self.fold:
            x = self.materialise(x)
        if x.perm is not None:  # the conv reads channel perm[j] of its input where Keras' reads channel j
            folded = np.empty_like(weights)
            folded[:, list(x.perm)] = weights
            weights = folded
            x = _Value(x.name, x.layout, hw=x.hw)
        x = self.nchw(x)
        inputs = [x.name, self.init(f"{op.name}/kernel", weights)]
        if cfg["use_bias"] and np.any(bias[0]):  # an all-zero bias left out, as tf2onnx's optimiser does
            inputs.append(self.init(f"{op.name}/bias", np.asarray(bias[0], np.float32)))
        size, strides, dilations = list(kernel.shape[:2]), list(cfg["strides"]), list(cfg["dilation_rate"])
        pad = _padding(cfg["padding"], x.hw, size, strides, dilations)
        relu = cfg["activation"] == "relu"
        out = self.node("Conv", inputs, f"{op.name}/conv" if relu else op.name, kernel_shape=size, group=1,
                        strides=strides, dilations=dilations, **pad)
        if relu:
            out = self.node("Relu", [out], op.name)
        return _Value(out, "nchw", hw=_out_hw(cfg["padding"], x.hw, size, strides, dilations))

    # -- the graph, traced back from the model's outputs
    def value(self, tensor) -> _Value:
        key = id(tensor)
        if key not in self.values:
            op, node_index, _ = tensor._keras_history
            if type(op).__name__ == "InputLayer":
                self.values[key] = _Value(self.input_name, "nhwc", hw=tuple(int(d) for d in tensor.shape[1:3]))
            else:
                node = op._inbound_nodes[node_index]
                self.values[key] = self.layer(op, [self.value(t) for t in node.input_tensors])
        return self.values[key]


def _padding(padding: str, hw, kernel, strides, dilations) -> dict:
    """ONNX padding attributes for Keras' `valid` / `same` (TensorFlow's: any odd pixel at the end)."""
    if padding == "valid":
        return {}
    if hw is None:
        return {"auto_pad": "SAME_UPPER"}
    begin, end = [], []
    for n, k, s, d in zip(hw, kernel, strides, dilations):
        total = max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0)
        begin.append(total // 2)
        end.append(total - total // 2)
    return {"pads": begin + end}


def _out_hw(padding: str, hw, kernel, strides, dilations):
    if hw is None:
        return None
    if padding == "same":
        return tuple(-(-n // s) for n, s in zip(hw, strides))
    return tuple((n - (k - 1) * d - 1) // s + 1 for n, k, s, d in zip(hw, kernel, strides, dilations))


def to_onnx(model, input_name: str, output_names, opset: int, fold_bgr: bool = True) -> onnx.ModelProto:
    """The Keras model `model` (single input, NHWC float32: an extractor, or the block5 top on block4 maps) as
    ONNX, outputs named `output_names` (one name or one per output, in the model's order). `fold_bgr=False`
    keeps caffe's channel swap as a Gather instead of folding it into the first Conv. Raises `Unsupported`
    for a model this writer does not cover."""
    if len(model.inputs) != 1 or len(model.inputs[0].shape) != 4 or None in tuple(model.inputs[0].shape[1:]):
        raise Unsupported("not a single 4-D input of a fixed size")
    names = [output_names] if isinstance(output_names, str) else list(output_names)
    if len(names) != len(model.outputs):
        raise Unsupported(f"{len(model.outputs)} outputs, {len(names)} names")
    w = _Writer(input_name, fold_bgr)
    outputs, values = [], [w.nhwc(w.value(tensor)) for tensor in model.outputs]
    for tensor, name, v in zip(model.outputs, names, values):
        consumed = {i for n in w.nodes for i in n.input} | {u.name for u in values if u is not v}
        producer = next(n for n in w.nodes if v.name in n.output)
        if v.name in consumed or v.name == input_name:  # shared with the rest of the graph: a copy under the name
            w.nodes.append(helper.make_node("Identity", [v.name], [name], name=f"output/{name}"))
        else:  # made for this output alone (the last Transpose, or the pooling): it is the output
            producer.output[0] = producer.name = name
        shape = [None, *(int(d) for d in tensor.shape[1:])]  # the batch axis: unknown, unnamed
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
    size = [int(d) for d in model.inputs[0].shape[1:]]
    graph = helper.make_graph(w.nodes, model.name, [helper.make_tensor_value_info(
        input_name, TensorProto.FLOAT, [None, *size])], outputs, w.inits)
    # the opsets tf2onnx declares (it always adds ai.onnx.ml 2): an extractor's identity hashes the opset
    # imports with the graph, so a model written here has the identity tf2onnx's conversion of it has, and
    # stores made with either extractor are the same store's rows
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid("ai.onnx.ml", 2)]
    # the oldest IR version that carries this opset: what older runtimes read (tf2onnx does the same)
    return helper.make_model(graph, opset_imports=opsets, producer_name=NAME,
                             ir_version=helper.find_min_ir_version_for(opsets[:1]))
