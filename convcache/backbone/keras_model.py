"""The Keras extractor: pixels in, VGG16's caffe preprocessing inside, a conv feature map out."""

from __future__ import annotations

import numpy as np

from convcache.errors import ConvcacheError
from convcache.tfquiet import import_keras

IMAGENET_BGR_MEAN = (103.939, 116.779, 123.68)
PREPROCESSING = "caffe: RGB->BGR, subtract ImageNet BGR mean (103.939, 116.779, 123.68), no scaling"


def build_extractor(base, layer: str | None = None, pooling: str | None = None):
    """Cut `base` after `layer` (default: its last), add preprocessing in front and optional pooling."""
    _, keras = import_keras()
    names = [lay.name for lay in base.layers]
    layer = layer or names[-1]
    if layer not in names:
        raise ConvcacheError(f"unknown layer {layer!r}; VGG16's are: {', '.join(names[1:])}")
    inputs = keras.Input(shape=base.input_shape[1:], dtype="float32", name="images")
    x = CaffePreprocess()(inputs)
    for lay in base.layers[1 : names.index(layer) + 1]:
        x = lay(x)
    if pooling == "avg":
        x = keras.layers.GlobalAveragePooling2D()(x)
    elif pooling == "max":
        x = keras.layers.GlobalMaxPooling2D()(x)
    elif pooling is not None:
        raise ConvcacheError(f"unknown pooling {pooling!r}; choose avg or max")
    return keras.Model(inputs, x, name="convcache_extractor")


def _caffe_layer_class():
    _, keras = import_keras()

    class CaffePreprocess(keras.layers.Layer):
        """RGB->BGR as a 3x3 permutation matmul (exact in fp32, converts to one ONNX MatMul)."""

        def call(self, x):
            ops = keras.ops
            perm = ops.convert_to_tensor(np.eye(3, dtype="float32")[::-1].copy())
            return ops.matmul(x, perm) - ops.convert_to_tensor(np.array(IMAGENET_BGR_MEAN, "float32"))

    return CaffePreprocess


def CaffePreprocess():  # noqa: N802 - a layer factory, named like the layer it builds
    return _caffe_layer_class()()
