"""`convcache info`: describe any ONNX file (identity, tensors, convcache metadata), a feature store
(splits, rows, copies, extractor, policy, skipped files, integrity), or the inference runtimes this
machine has. Not a stage: it reads every kind of artifact."""

from __future__ import annotations

import json


def register(sub) -> None:
    i = sub.add_parser("info", help="describe an ONNX file (inputs, outputs, opsets, identity, convcache metadata) "
                                    "or a feature store (splits, rows, copies, extractor, policy, skipped files, "
                                    "integrity); --runtime: the inference runtimes this machine has")
    i.add_argument("model", nargs="?", help="an .onnx file or a feature store (.zarr directory or URL)")
    i.add_argument("--runtime", action="store_true",
                   help="report the active ONNX Runtime build and its providers, OpenVINO, and what --device auto "
                        "picks (exit 2 if the installed runtimes conflict)")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=run_info)


def run_info(args) -> int:
    from convcache.artifacts import describe
    from convcache.errors import ConvcacheError

    if args.runtime:
        from convcache.gpudecode import report as decoders
        from convcache.runtime import report

        rep = report()
        rep["decoders"] = decoders()
        if args.json:
            print(json.dumps(rep, indent=2, sort_keys=True))
        else:
            for key in ("onnxruntime", "onnxruntime_distributions", "providers", "openvino", "openvino_devices",
                        "cpu", "auto", "decoders"):
                if key in rep:
                    print(f"{key:>26}: {rep[key]}")
            for problem in rep["problems"]:
                print(f"{'PROBLEM':>26}: {problem}")
        return 2 if rep["problems"] else 0
    if not args.model:
        raise ConvcacheError("info needs a model or a store (or --runtime)")
    from convcache.store.info import is_store

    if is_store(args.model):
        return _store_info(args.model, args.json)
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


def _store_info(path: str, as_json: bool) -> int:
    from convcache.store.info import describe_store

    info = describe_store(path)
    if as_json:
        print(json.dumps(info, indent=2, sort_keys=True))
    else:
        print(f"{'store':>16}: {info['store']} ({info['format']})")
        print(f"{'classes':>16}: {', '.join(info['classes'])}")
        for split, s in info["splits"].items():
            e, a = s["extractor"], s["augment"] or {}
            print(f"{split:>16}: {s['rows']} rows, copies 0..{s['copies']}, features {s['feature_shape']} "
                  f"{s['dtype']}, integrity: {s['integrity']}")
            if len(s["variables"]) > 1:  # a tapped extractor's store: one variable per tap
                print(f"{'':>16}  taps: " + ", ".join(f"{v} {d['shape']} ({d['bytes'] / 2**20:.1f} MiB)"
                                                       for v, d in s["variables"].items()))
            print(f"{'':>16}  extractor {e['identity'][:12]} ({e['weights']}, {e['layer']}"
                  f"{', ' + e['pooling'] if e['pooling'] else ''}, {e['preprocess']}, {e['precision']}, "
                  f"{e['size']}px); augment seed {a.get('seed')}, policy {json.dumps(a.get('policy'))}")
            if s["made_on"]:
                print(f"{'':>16}  made on {', '.join(s['made_on'])}"
                      f"{' (mixed: not bitwise comparable)' if len(s['made_on']) > 1 else ''}")
            for file, reason in sorted(s["skipped"].items()):
                print(f"{'':>16}  skipped {file}: {reason}")
    damaged = [n for n, s in info["splits"].items() if s["integrity"] != "intact"]
    return 1 if damaged else 0
