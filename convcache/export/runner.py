"""export: build, convert, verify, annotate and save the extractor."""

from __future__ import annotations

import logging
from pathlib import Path

import onnx

from convcache.errors import ConvcacheError
from convcache.backbone import keras_model, weights
from convcache.export import onnx_target, quantize
from convcache import artifacts

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")


def export_extractor(weights_source: str, input_size: int, output: str, layer: str | None = None,
                     pooling: str | None = None, precision: str = "fp32", calibration: str | None = None,
                     seed: int = 0, opset: int = 17) -> dict:
    if precision not in PRECISIONS:
        raise ConvcacheError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "int8" and not calibration:
        raise ConvcacheError("--precision int8 needs --calibration DIR (a folder of images)")
    if calibration and not Path(calibration).is_dir():
        raise ConvcacheError(f"--calibration {calibration}: not a directory")
    base = weights.load_vgg16(weights_source, input_size, seed)
    model = keras_model.build_extractor(base, layer, pooling)
    proto = onnx_target.keras_to_onnx(model, opset)
    onnx.checker.check_model(proto, full_check=True)
    diff = onnx_target.check_parity(proto, model, onnx_target.sample_images(4, input_size, seed))

    meta = {"precision": precision, "parity_max_abs_diff": diff, "opset": opset}
    if precision == "fp16":
        proto = quantize.to_fp16(proto)
    elif precision == "int8":
        images = quantize.load_calibration(calibration, input_size)
        calib, held = quantize.split_held_out(images)
        fp32 = proto
        proto = quantize.to_int8(fp32, calib)
        meta["quantization"] = {"format": "QDQ static, per-channel weights, MinMax calibration, first and last conv kept fp32",
                                "calibration_images": int(len(calib)),
                                **quantize.cosine_report(fp32, proto, held)}
    if precision != "fp32":
        onnx.checker.check_model(proto, full_check=True)

    out_shape = [None, *(int(d) for d in model.output_shape[1:])]
    meta.update({
        "weights": {"source": weights_source, "sha256": weights.weights_sha256(base)},
        "input": {"name": artifacts.IMAGES, "layout": "NHWC", "dtype": "float32",
                  "size": input_size, "pixels": "RGB, 0-255"},
        "preprocessing": keras_model.PREPROCESSING,
        "output": {"name": artifacts.FEATURES, "shape": out_shape},
        "layer": layer or base.layers[-1].name,
        "pooling": pooling,
        "versions": onnx_target.library_versions(),
        "created": onnx_target.now_iso(),
    })
    meta = artifacts.write_metadata(proto, artifacts.KIND_EXTRACTOR, meta)
    artifacts.save_model(proto, output)  # never leaves a half-written model under the real name
    return meta
