"""The Keras extractor: pixels in, the chosen preprocessing inside, a conv feature map out.

Two preprocessings, both inside the graph:
- `caffe`: Keras' `vgg16.preprocess_input` (RGB->BGR, minus the ImageNet BGR mean, no scaling): what the
  ImageNet weights were trained with;
- `rescale`: the book's sec. 5.3 (`ImageDataGenerator(rescale=1./255)` before `conv_base.predict`): x / 255,
  RGB order, no mean. Its features are ~100x smaller than caffe's, and RMSprop 2e-5 was tuned on them.
"""

from __future__ import annotations

import numpy as np

from convcache.errors import ConvcacheError
from convcache.tfquiet import import_keras

IMAGENET_BGR_MEAN = (103.939, 116.779, 123.68)
PREPROCESSINGS = {
    "caffe": "caffe: RGB->BGR, subtract ImageNet BGR mean (103.939, 116.779, 123.68), no scaling",
    "rescale": "rescale: x / 255, RGB order, no mean (the book's ImageDataGenerator(rescale=1./255))",
}
DEFAULT_PREPROCESS = "caffe"
PREPROCESSING = PREPROCESSINGS[DEFAULT_PREPROCESS]  # the default's description (older callers)


def check_preprocess(preprocess: str) -> str:
    if preprocess not in PREPROCESSINGS:
        raise ConvcacheError(f"unknown preprocessing {preprocess!r}; choose {' or '.join(PREPROCESSINGS)}")
    return preprocess


def build_extractor(base, layer: str | None = None, pooling: str | None = None, preprocess: str = DEFAULT_PREPROCESS):
    """Cut `base` after `layer` (default: its last), add `preprocess` in front and optional pooling."""
    _, keras = import_keras()
    check_preprocess(preprocess)
    inputs = keras.Input(shape=base.input_shape[1:], dtype="float32", name="images")
    rescale = keras.layers.Rescaling(1.0 / 255, name="rescale")
    x = CaffePreprocess()(inputs) if preprocess == "caffe" else rescale(inputs)
    return keras.Model(inputs, _cut(keras, base, x, layer, pooling), name="convcache_extractor")


def build_tapped_extractor(base, taps, preprocess: str = DEFAULT_PREPROCESS):
    """One model, one pass through `base`, an output per tap (`taps`: objects with layer and pooling), in
    order: the deepest tap's layer ends the pass; each tap reads the activation after its layer."""
    _, keras = import_keras()
    check_preprocess(preprocess)
    inputs = keras.Input(shape=base.input_shape[1:], dtype="float32", name="images")
    x = CaffePreprocess()(inputs) if preprocess == "caffe" else keras.layers.Rescaling(1.0 / 255, name="rescale")(
        inputs)
    names = [lay.name for lay in base.layers]
    unknown = [t.layer for t in taps if t.layer not in names]
    if unknown:
        raise ConvcacheError(f"unknown layer {unknown[0]!r}; VGG16's are: {', '.join(names[1:])}")
    deepest = max(names.index(t.layer) for t in taps)
    after = {}
    for lay in base.layers[1 : deepest + 1]:
        x = after[lay.name] = lay(x)
    outputs = [_pool(keras, after[t.layer], t.pooling, t.name) for t in taps]
    return keras.Model(inputs, outputs, name="convcache_tapped_extractor")


def cut_base(base, layer: str | None = None, pooling: str | None = None):
    """The base cut at `layer` with optional pooling and *no* preprocessing (takes preprocessed input)."""
    _, keras = import_keras()
    inputs = keras.Input(shape=base.input_shape[1:], dtype="float32")
    return keras.Model(inputs, _cut(keras, base, inputs, layer, pooling))


def _cut(keras, base, x, layer, pooling):
    names = [lay.name for lay in base.layers]
    layer = layer or names[-1]
    if layer not in names:
        raise ConvcacheError(f"unknown layer {layer!r}; VGG16's are: {', '.join(names[1:])}")
    for lay in base.layers[1 : names.index(layer) + 1]:
        x = lay(x)
    return _pool(keras, x, pooling)


def _pool(keras, x, pooling, name: str | None = None):
    if pooling == "avg":
        return keras.layers.GlobalAveragePooling2D(name=name)(x)
    if pooling == "max":
        return keras.layers.GlobalMaxPooling2D(name=name)(x)
    if pooling is not None:
        raise ConvcacheError(f"unknown pooling {pooling!r}; choose avg or max")
    return x


def keras_preprocess(images: np.ndarray, preprocess: str) -> np.ndarray:
    """The same preprocessing as Keras itself applies it, outside any convcache code: the parity reference."""
    _, keras = import_keras()
    x = np.array(images, np.float32, copy=True)
    if check_preprocess(preprocess) == "caffe":
        return np.asarray(keras.applications.vgg16.preprocess_input(x), np.float32)
    return x * np.float32(1.0 / 255)  # ImageDataGenerator(rescale=1./255) multiplies by the factor


def _caffe_layer_class():
    _, keras = import_keras()

    class CaffePreprocess(keras.layers.Layer):
        """RGB->BGR as a 3x3 permutation matmul (exact in fp32, converts to one ONNX MatMul)."""

        def call(self, x):
            ops = keras.ops
            perm = ops.convert_to_tensor(np.eye(3, dtype="float32")[::-1].copy())
            return ops.matmul(x, perm) - ops.convert_to_tensor(np.array(IMAGENET_BGR_MEAN, "float32"))

    return CaffePreprocess


def CaffePreprocess():
    return _caffe_layer_class()()
