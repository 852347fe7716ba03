"""Keras -> ONNX (written directly by `convcache.artifacts.keras_onnx`, or converted by tf2onnx), then verification:
the full checker and parity with Keras."""

from __future__ import annotations

import logging
import platform
from datetime import datetime, timezone

import numpy as np
import onnx

from convcache import __version__
from convcache.artifacts import FEATURES as OUTPUT_NAME
from convcache.artifacts import IMAGES as INPUT_NAME
from convcache.artifacts import compose as onnxcompose
from convcache.artifacts import convert as onnxtools
from convcache.errors import ConvcacheError
from convcache.tfquiet import import_keras

log = logging.getLogger(__name__)

PARITY_RTOL = 1e-4  # max abs diff allowed, relative to max |reference|
CONVERTERS = ("auto", "direct", "tf2onnx")


def extractor_to_onnx(model, opset: int = 17, fold_bgr: bool = True, output_names=None,
                      converter: str = "auto") -> onnx.ModelProto:
    """The extractor as ONNX; with caffe preprocessing (`fold_bgr`), the RGB->BGR permutation folded into
    block1_conv1's weights: images -> Sub(mean) -> Transpose -> Conv.

    `converter`: `direct` writes the graph from the Keras layers (`convcache.artifacts.keras_onnx`: a 150-px
    VGG16 export peaks at 1.3 GiB against 3.4 GiB with tf2onnx, experiments/bench_converter.py); `tf2onnx`
    converts the TensorFlow graph (any Keras model); `auto` writes directly and falls back to tf2onnx for a
    layer the direct writer does not cover. Which one made the graph is in its producer name (`converter_of`)."""
    from convcache.artifacts import keras_onnx

    if converter not in CONVERTERS:
        raise ConvcacheError(f"unknown converter {converter!r}; choose one of {', '.join(CONVERTERS)}")
    names = output_names or OUTPUT_NAME
    if converter != "tf2onnx":
        try:
            return keras_onnx.to_onnx(model, INPUT_NAME, names, opset, fold_bgr)
        except keras_onnx.Unsupported as exc:
            if converter == "direct":
                raise ConvcacheError(f"--converter direct: {exc}") from None
            log.info("converting with tf2onnx: %s", exc)
    size = model.input_shape[1]
    proto = onnxtools.keras_to_onnx(model, INPUT_NAME, (size, size, 3), names, opset)
    if fold_bgr and not onnxcompose.fold_channel_permutation(proto):
        log.warning("the RGB->BGR permutation was not found in the converted graph; left unfolded")
    return proto


def converter_of(proto: onnx.ModelProto) -> str:
    """`direct` or `tf2onnx`: what made an extractor graph (its producer name)."""
    from convcache.artifacts import keras_onnx

    return "direct" if proto.producer_name == keras_onnx.NAME else proto.producer_name or "unknown"


def sample_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Real-looking test inputs: smooth random colour fields with edges, values 0..255 (float32)."""
    import cv2

    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size, 3), np.float32)
    for i in range(n):
        coarse = rng.uniform(0, 255, (6, 6, 3)).astype(np.float32)
        img = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
        y0, x0 = rng.integers(0, size // 2, 2)
        img[y0 : y0 + size // 3, x0 : x0 + size // 3] = rng.uniform(0, 255, 3)  # a hard-edged patch
        out[i] = np.clip(img + rng.normal(0, 8, img.shape), 0, 255)
    return out


def check_extractor_parity(proto: onnx.ModelProto, keras_model, images: np.ndarray,
                           preprocess: str | None = None, output: str = OUTPUT_NAME) -> float:
    """Run both; fail when ORT strays from Keras. Returns the max abs diff. With `preprocess`, `keras_model`
    takes preprocessed input, and the images go through Keras' own preprocessing for it
    (`vgg16.preprocess_input` for caffe, x/255 for rescale) rather than through convcache's layers."""
    from convcache.backbone.keras_model import keras_preprocess

    inputs = images if preprocess is None else keras_preprocess(images, preprocess)
    reference = np.asarray(keras_model.predict(inputs, verbose=0))
    bound = PARITY_RTOL * float(np.max(np.abs(reference)))
    diff = onnxtools.check_parity(proto, reference, {INPUT_NAME: images}, output, bound,
                                  f"ONNX/Keras parity failed{'' if output == OUTPUT_NAME else ' (' + output + ')'}")
    log.info("parity with Keras: max abs diff %.3g (bound %.3g)", diff, bound)
    return diff


def library_versions() -> dict:
    import onnxruntime
    import tf2onnx

    tf, keras = import_keras()
    return {"convcache": __version__, "python": platform.python_version(), "tensorflow": tf.__version__,
            "keras": keras.__version__, "tf2onnx": tf2onnx.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "numpy": np.__version__}


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
