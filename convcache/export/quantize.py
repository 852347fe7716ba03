"""Precision variants: fp16 (for GPUs) and static int8 QDQ calibrated on real images."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx

from convcache.errors import ConvcacheError, ImageError
from convcache.imaging import read_and_decode

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def to_fp16(proto: onnx.ModelProto) -> onnx.ModelProto:
    """fp16 weights and activations; callers still feed float32 pixels and get float32 features (the graph
    `extract --precision fp16` runs: one function, `runtime.to_fp16`)."""
    from convcache.runtime import to_fp16 as half

    return half(proto)


def load_calibration(folder: str, size: int, limit: int = 200) -> np.ndarray:
    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ConvcacheError(f"--calibration {folder}: no images found")
    step = max(1, len(paths) // limit)
    images = []
    for p in paths[::step][:limit]:
        try:
            images.append(read_and_decode(p, size)[1])
        except ImageError as exc:
            log.warning("calibration: skipping %s (%s)", p, exc.reason)
    if len(images) < 2:
        raise ConvcacheError(f"--calibration {folder}: need at least 2 readable images")
    return np.stack(images).astype(np.float32)


def split_held_out(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every 5th image is held out for the cosine report, never used to calibrate."""
    held = np.arange(len(images)) % 5 == 4
    if not held.any():
        held[-1] = True
    return images[~held], images[held]


def to_int8(proto: onnx.ModelProto, calibration: np.ndarray, per_channel: bool = True,
            exclude_first_conv: bool = True, exclude_last_conv: bool = True,
            method: str = "minmax") -> onnx.ModelProto:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{proto.graph.input[0].name: calibration[i : i + 8]}
                                 for i in range(0, len(calibration), 8)])

        def get_next(self):
            return next(self.batches, None)

    convs = [n.name for n in proto.graph.node if n.op_type == "Conv"]
    exclude = (convs[:1] if exclude_first_conv else []) + (convs[-1:] if exclude_last_conv else [])
    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    with tempfile.TemporaryDirectory() as tmp:
        src, pre, dst = (str(Path(tmp) / n) for n in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        onnx.save(proto, src)
        quant_pre_process(src, pre, skip_symbolic_shape=True)
        quantize_static(pre, dst, Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=methods[method], nodes_to_exclude=exclude,
                        op_types_to_quantize=["Conv", "MaxPool", "GlobalAveragePool", "GlobalMaxPool"])
        return onnx.load(dst)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Each row's cosine between two feature sets (rows flattened)."""
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


def cosine_report(fp32: onnx.ModelProto, quantized: onnx.ModelProto, images: np.ndarray) -> dict:
    from convcache.artifacts.convert import session

    def run(p):
        s = session(p)
        return s.run(None, {s.get_inputs()[0].name: images})[0].reshape(len(images), -1)

    cos = cosines(run(fp32), run(quantized))
    return {"held_out_images": int(len(images)), "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}
