"""Predictor: a fused convcache model in-process. It provides the serving hooks (`decode`, `infer`,
`postprocess`: `convcache.serve.loop.PredictorHooks`); the loop calls them. Decoding and resizing are
extract's (convcache.imaging)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from convcache import artifacts
from convcache.errors import ConvcacheError, ImageError
from convcache.imaging import DEFAULT_MAX_PIXELS, decode_image, decode_opened, prepare_image, read_bytes
from convcache.runtime import BoundRunner, create_session, resolve_device, uint8_input
from convcache.serve import loop


@dataclass
class Prediction:
    """The most probable class (`class_`, "class" in every JSON answer: the HTTP service, `predict`, the
    OpenAPI schema) and each class's probability."""

    class_: str
    probabilities: dict

    @property
    def label(self) -> str:
        """The same as `class_` (the name before the answers agreed on "class")."""
        return self.class_

    def to_dict(self) -> dict:
        return {"class": self.class_, "probabilities": self.probabilities}


class Predictor:
    """`Predictor("model.onnx").predict(images)`: images are paths, bytes, PIL images or HxWx3 arrays.

    A path, its bytes and the PIL image `Image.open(path)` give the same pixels (draft decoding for
    JPEGs, EXIF orientation). A PIL image that is already loaded, or an array, is taken as already
    decoded and oriented: no draft decoding (a JPEG then resizes from full resolution, which can differ
    by a few grey levels), no EXIF."""

    def __init__(self, model: str | os.PathLike, device: str = "auto", batch_size: int = 32,
                 max_pixels: int = DEFAULT_MAX_PIXELS, threads: int | None = None, io: str = "auto"):
        """`io`: plain runs float32 pixels through `session.run`; bound feeds uint8 pixels (what decoding gives)
        through IO binding to a second session of the graph with a Cast in front (the same answers, a quarter
        of the bytes to a GPU; float pixels, which the Open Inference Protocol accepts, still go the plain way);
        auto is bound on CUDA, plain elsewhere."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConvcacheError(f"batch size {batch_size!r}: must be at least 1")
        if io not in ("auto", "plain", "bound"):
            raise ConvcacheError(f"io {io!r}: one of auto, plain, bound")
        self.contract = artifacts.read(model, artifacts.KIND_FUSED)
        self.classes = list(self.contract.classes)
        self.size = self.contract.size
        self.model_id = self.sha256 = self.contract.identity  # the one model id (see convcache.artifacts)
        self.batch_size = batch_size
        self.max_pixels = max_pixels
        where = resolve_device(device)
        self.io = "bound" if io == "bound" or (io == "auto" and where == "cuda") else "plain"
        if self.io == "bound" and where not in ("cuda", "cpu"):
            raise ConvcacheError(f"io bound runs on ONNX Runtime (CUDA, or the CPU), not --device {where}")
        self.session = create_session(str(model), where, threads)
        self.provider = self.session.get_providers()[0]
        self._runner = None
        if self.io == "bound":
            bound = create_session(uint8_input(artifacts.load_model(model)).SerializeToString(), where, threads)
            self._runner = BoundRunner(bound, bound.get_inputs()[0].name, list(self.contract.outputs),
                                       "cuda" if self.provider == "CUDAExecutionProvider" else "cpu", reuse=False)

    def decode(self, image, budget=None) -> np.ndarray:
        """One input -> uint8 size x size x 3; raises ImageError for unusable input. `budget` (an
        `imaging.MemoryBudget`) holds the decode's memory, every intermediate counted."""
        if isinstance(image, (str, Path)):
            return decode_image(read_bytes(image), self.size, self.max_pixels, budget=budget)
        if isinstance(image, (bytes, bytearray, memoryview)):
            return decode_image(bytes(image), self.size, self.max_pixels, budget=budget)
        if isinstance(image, Image.Image):  # decoded as a file would be (draft if not loaded yet, EXIF)
            try:
                return decode_opened(image, self.size, budget=budget)
            except (OSError, ValueError, SyntaxError) as exc:
                raise ImageError(f"corrupt or truncated image: {exc}") from None
        if isinstance(image, np.ndarray):
            if image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3, 4)):
                arr = image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image
                return prepare_image(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), self.size)
            raise ImageError(f"an array image must be HxW or HxWx{{1,3,4}}, got shape {image.shape}")
        raise ImageError(f"unsupported input type {type(image).__name__}")

    def infer(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A batch of uint8 pixels -> (probabilities, flattened features)."""
        if self._runner is not None and pixels.dtype == np.uint8:
            probs, feats = self._runner(pixels)
        else:
            probs, feats = self.session.run(list(self.contract.outputs),
                                            {self.contract.input_name: pixels.astype(np.float32)})
        return probs, feats.reshape(len(pixels), -1)

    def postprocess(self, probs: np.ndarray) -> Prediction:
        return Prediction(self.classes[int(np.argmax(probs))],
                          {c: float(p) for c, p in zip(self.classes, probs)})

    # the hooks' earlier names
    to_pixels, run_pixels, to_prediction = decode, infer, postprocess

    def predict(self, images) -> list[Prediction] | Prediction:
        """Predictions for a list (batched), or one Prediction for a single input."""
        single = not isinstance(images, (list, tuple))
        out = loop.predict(self, [images] if single else list(images), self.batch_size)
        return out[0] if single else out

    def predict_each(self, images, workers: int | None = None, budget=None):
        """(image, Prediction or ImageError) for each of many images (an iterable: paths from a folder or a pipe),
        in order, as they are answered: decoded in `workers` threads ahead of inference (default: the cores this
        process may use), `batch_size` images an inference call; an image that does not decode gives its
        ImageError and spoils no other. `budget` (an `imaging.MemoryBudget`) holds the decodes' memory."""
        for image, got in loop.stream(self, images, self.batch_size, workers, budget):
            yield image, got if isinstance(got, ImageError) else self.postprocess(got)

    def features(self, images) -> np.ndarray:
        return loop.features(self, list(images) if isinstance(images, (list, tuple)) else [images], self.batch_size)
