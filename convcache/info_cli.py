"""`convcache info`: describe any ONNX file (identity, tensors, convcache metadata), or the inference
runtimes this machine has. Not a stage: it reads every kind of artifact."""

from __future__ import annotations

import json


def register(sub) -> None:
    i = sub.add_parser("info", help="describe any ONNX file: inputs, outputs, opsets, identity, convcache metadata; "
                                    "--runtime: the inference runtimes this machine has")
    i.add_argument("model", nargs="?", help="an .onnx file")
    i.add_argument("--runtime", action="store_true",
                   help="report the active ONNX Runtime build and its providers, OpenVINO, and what --device auto "
                        "picks (exit 2 if the installed runtimes conflict)")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=run_info)


def run_info(args) -> int:
    from convcache.artifacts import describe
    from convcache.errors import ConvcacheError

    if args.runtime:
        from convcache.runtime import report

        rep = report()
        if args.json:
            print(json.dumps(rep, indent=2, sort_keys=True))
        else:
            for key in ("onnxruntime", "onnxruntime_distributions", "providers", "openvino", "openvino_devices",
                        "cpu", "auto"):
                if key in rep:
                    print(f"{key:>26}: {rep[key]}")
            for problem in rep["problems"]:
                print(f"{'PROBLEM':>26}: {problem}")
        return 2 if rep["problems"] else 0
    if not args.model:
        raise ConvcacheError("info needs a model (or --runtime)")
    info = describe(args.model)
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    print(f"{'identity':>20}: {info['identity']}")
    for role in ("inputs", "outputs"):
        for t in info[role]:
            print(f"{role[:-1]:>20}: {t['name']} {t['dtype']} {t['shape']}")
    print(f"{'opsets':>20}: {', '.join(f'{d} {v}' for d, v in sorted(info['opsets'].items()))}")
    print(f"{'producer':>20}: {info['producer'] or '?'} (IR {info['ir_version']}, {info['nodes']} nodes)")
    meta = info["convcache"]
    if not meta:
        print(f"{'convcache':>20}: no convcache metadata (not made by convcache)")
    for key in sorted(meta):
        value = meta[key]
        print(f"{key:>20}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    return 0
