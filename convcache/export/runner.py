"""export: build, convert, verify, annotate and save the extractor."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import onnx

from convcache import artifacts
from convcache.backbone import keras_model, weights
from convcache.errors import ConvcacheError
from convcache.export import onnx_target, quantize

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
POOLINGS = (None, "avg", "max")
KEEP_FP32 = ("none", "first", "last", "first-last")  # int8: which convs stay fp32
LAYERS = ("block1_pool", "block2_pool", "block3_pool", "block4_pool", "block5_pool",
          *weights.CONV_LAYERS)


@dataclass
class ExportConfig:
    """What `convcache export` builds; validated when constructed, before TensorFlow starts."""

    weights: str = "hed"  # imagenet, hed, random, or a Keras weights file
    input_size: int = 150
    output: str = "extractor.onnx"
    layer: str | None = None  # default: block5_pool
    pooling: str | None = None
    precision: str = "fp32"
    calibration: str | None = None
    seed: int = 0
    opset: int = 17
    keep_fp32: str = "first-last"  # int8: convs left in fp32 (first, last, first-last, none)
    probe: str | None = None  # labelled images for the int8/fp16 probe (int8: default --calibration, if labelled)
    probe_limit: int = 1000
    preprocess: str = keras_model.DEFAULT_PREPROCESS  # caffe (Keras' preprocess_input) or rescale (the book's x/255)
    taps: tuple | None = None  # several outputs from one pass: "block4_pool:avg", "block5_pool", ... (artifacts.Tap)
    converter: str = "auto"  # direct (the graph written from the layers), tf2onnx, or auto (direct, else tf2onnx)

    def __post_init__(self):
        if self.weights not in weights.NAMED_SOURCES and not Path(self.weights).is_file():
            raise ConvcacheError(f"unknown weights source {self.weights!r}: not one of "
                                 f"{', '.join(weights.NAMED_SOURCES)} and not an existing weights file")
        if self.input_size < weights.MIN_INPUT_SIZE:
            raise ConvcacheError(f"--input-size {self.input_size} is below VGG16's minimum of {weights.MIN_INPUT_SIZE}")
        if self.layer is not None and self.layer not in LAYERS:
            raise ConvcacheError(f"unknown layer {self.layer!r}; VGG16's are: {', '.join(LAYERS)}")
        if self.pooling not in POOLINGS:
            raise ConvcacheError(f"unknown pooling {self.pooling!r}; choose avg or max")
        if self.precision not in PRECISIONS:
            raise ConvcacheError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.precision == "int8" and not self.calibration:
            raise ConvcacheError("--precision int8 needs --calibration DIR (a folder of images)")
        if self.calibration and not Path(self.calibration).is_dir():
            raise ConvcacheError(f"--calibration {self.calibration}: not a directory")
        if self.keep_fp32 not in KEEP_FP32:
            raise ConvcacheError(f"--keep-fp32 {self.keep_fp32!r}: choose one of {', '.join(KEEP_FP32)}")
        if self.probe and self.precision == "fp32":
            raise ConvcacheError("--probe reports what int8 or fp16 costs a linear probe: it needs --precision "
                                 "int8 or fp16")
        if self.probe and not Path(self.probe).is_dir():
            raise ConvcacheError(f"--probe {self.probe}: not a directory")
        if self.probe_limit < 12:
            raise ConvcacheError("--probe-limit must be >= 12")
        keras_model.check_preprocess(self.preprocess)
        if self.converter not in onnx_target.CONVERTERS:
            raise ConvcacheError(f"unknown converter {self.converter!r}; choose one of "
                                 f"{', '.join(onnx_target.CONVERTERS)}")
        if self.seed < 0 or not 13 <= self.opset <= 21:
            raise ConvcacheError("--seed must be >= 0 and --opset between 13 and 21")
        if self.taps is not None:
            self.taps = tuple(t if isinstance(t, artifacts.Tap) else artifacts.Tap.parse(t) for t in self.taps)
            names = [t.name for t in self.taps]
            if not names or len(set(names)) != len(names):
                raise ConvcacheError(f"--taps {','.join(names)}: give at least one tap, each once")
            if self.layer or self.pooling:
                raise ConvcacheError("--taps names each output's layer and pooling: not with --layer or --pooling")
            if self.precision != "fp32":
                raise ConvcacheError("--taps exports fp32 (fp16 and int8 are for one-output extractors)")
            bad = [t.layer for t in self.taps if t.layer not in LAYERS]
            if bad:
                raise ConvcacheError(f"--taps: unknown layer {bad[0]!r}; VGG16's are: {', '.join(LAYERS)}")


def _probe(cfg: ExportConfig, fp32: onnx.ModelProto, int8: onnx.ModelProto) -> dict:
    """The int8 (fp16) task report: on --probe, else (int8) on the calibration images when they are labelled."""
    from convcache.export.probe import probe_report

    folder = cfg.probe or cfg.calibration
    try:
        rep = probe_report(fp32, int8, folder, cfg.input_size, cfg.probe_limit, cfg.seed, cfg.precision)
    except ConvcacheError as exc:
        if cfg.probe:
            raise
        log.warning("no int8 probe report (%s); pass --probe DIR with labelled images", exc)
        return {"skipped": str(exc)}
    if not cfg.probe:
        rep["note"] = "probed on the calibration images themselves (the int8 ranges were set on them)"
    return rep


def export_extractor(weights_source: str, input_size: int, output: str, **options) -> dict:
    """`run_export(ExportConfig(weights_source, input_size, output, **options))`: the options are ExportConfig's
    (layer, pooling, precision, calibration, seed, opset, keep_fp32, probe, preprocess), checked there once."""
    return run_export(ExportConfig(weights_source, input_size, output, **options))


def run_export(cfg: ExportConfig) -> dict:
    weights_source, input_size, output, layer, pooling = cfg.weights, cfg.input_size, cfg.output, cfg.layer, cfg.pooling
    precision, calibration, seed, opset = cfg.precision, cfg.calibration, cfg.seed, cfg.opset
    base = weights.load_vgg16(weights_source, input_size, seed)
    if cfg.taps:
        return _export_taps(cfg, base)
    model = keras_model.build_extractor(base, layer, pooling, cfg.preprocess)
    proto = onnx_target.extractor_to_onnx(model, opset, fold_bgr=cfg.preprocess == "caffe", converter=cfg.converter)
    converter = onnx_target.converter_of(proto)
    onnx.checker.check_model(proto, full_check=True)
    # parity against Keras' own preprocessing (vgg16.preprocess_input, or x/255) and the cut base
    diff = onnx_target.check_extractor_parity(proto, keras_model.cut_base(base, layer, pooling),
                                    onnx_target.sample_images(4, input_size, seed), cfg.preprocess)

    meta = {"precision": precision, "parity_max_abs_diff": diff, "opset": opset, "converter": converter}
    if precision == "fp16":
        fp32, proto = proto, quantize.to_fp16(proto)
        sample = quantize.cosine_report(fp32, proto, onnx_target.sample_images(4, input_size, seed))
        meta["fp16"] = {"format": "onnxconverter-common float16: fp16 weights and activations, float32 input and "
                                  "output", "sample_images": sample["held_out_images"],
                        "cosine_mean": sample["cosine_mean"], "cosine_min": sample["cosine_min"]}
        if cfg.probe:
            meta["fp16"]["probe"] = _probe(cfg, fp32, proto)
    elif precision == "int8":
        images = quantize.load_calibration(calibration, input_size)
        calib, held = quantize.split_held_out(images)
        fp32 = proto
        proto = quantize.to_int8(fp32, calib, exclude_first_conv="first" in cfg.keep_fp32,
                                 exclude_last_conv="last" in cfg.keep_fp32)
        kept = {"none": "every conv int8", "first": "first conv kept fp32", "last": "last conv kept fp32",
                "first-last": "first and last conv kept fp32"}[cfg.keep_fp32]
        meta["quantization"] = {"format": f"QDQ static, per-channel weights, MinMax calibration, {kept}",
                                "keep_fp32": cfg.keep_fp32,
                                "calibration_images": int(len(calib)),
                                **quantize.cosine_report(fp32, proto, held)}
        meta["quantization"]["probe"] = _probe(cfg, fp32, proto)
    if precision != "fp32":
        onnx.checker.check_model(proto, full_check=True)

    contract = artifacts.Extractor(
        size=input_size, feature_shape=tuple(int(d) for d in model.output_shape[1:]),
        layer=layer or base.layers[-1].name, pooling=pooling, precision=precision, preprocess=cfg.preprocess,
        weights_source=weights_source, weights_sha256=weights.weights_sha256(base), weights_seed=seed, opset=opset,
        input_name=artifacts.IMAGES, output_name=artifacts.FEATURES,
        provenance={**meta, "preprocessing": keras_model.PREPROCESSINGS[cfg.preprocess],
                    "versions": onnx_target.library_versions(), "created": onnx_target.now_iso()})
    meta = contract.write(proto).metadata
    artifacts.save_model(proto, output)  # never leaves a half-written model under the real name
    return meta


def _export_taps(cfg: ExportConfig, base) -> dict:
    """One extractor, one pass, an output per tap; each output checked against Keras' own preprocessing and
    the base cut at that tap (as a one-output export is)."""
    model = keras_model.build_tapped_extractor(base, cfg.taps, cfg.preprocess)
    names = [t.name for t in cfg.taps]
    proto = onnx_target.extractor_to_onnx(model, cfg.opset, fold_bgr=cfg.preprocess == "caffe", output_names=names,
                                          converter=cfg.converter)
    onnx.checker.check_model(proto, full_check=True)
    images = onnx_target.sample_images(4, cfg.input_size, cfg.seed)
    diffs = {t.name: onnx_target.check_extractor_parity(proto, keras_model.cut_base(base, t.layer, t.pooling), images,
                                                        cfg.preprocess, output=t.name) for t in cfg.taps}
    shapes = [tuple(int(d) for d in out.shape[1:]) for out in model.outputs]
    taps = tuple(artifacts.Tap(t.layer, t.pooling, shape) for t, shape in zip(cfg.taps, shapes))
    first = taps[0]
    contract = artifacts.Extractor(
        size=cfg.input_size, feature_shape=first.shape, layer=first.layer, pooling=first.pooling, precision="fp32",
        preprocess=cfg.preprocess, weights_source=cfg.weights, weights_sha256=weights.weights_sha256(base),
        weights_seed=cfg.seed, opset=cfg.opset, input_name=artifacts.IMAGES, output_name=first.name, taps=taps,
        provenance={"parity_max_abs_diff": max(diffs.values()), "parity_per_tap": diffs,
                    "converter": onnx_target.converter_of(proto),
                    "preprocessing": keras_model.PREPROCESSINGS[cfg.preprocess],
                    "versions": onnx_target.library_versions(), "created": onnx_target.now_iso()})
    meta = contract.write(proto).metadata
    artifacts.save_model(proto, cfg.output)
    return meta
