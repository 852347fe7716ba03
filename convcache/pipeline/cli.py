"""`convcache compare`."""

from __future__ import annotations

import argparse
from dataclasses import fields


def register(sub) -> None:
    from convcache.pipeline.compare import CompareConfig

    d = {f.name: f.default for f in fields(CompareConfig) if not callable(f.default_factory)}
    c = sub.add_parser(
        "compare", help="method 1, method 2 (replayed from the cache), cached augmentation and the linear probe, "
                        "under one fair protocol",
        description="Export, extract copies 0..max(K, epochs), then train every arm with several seeds: method 1 "
                    "(dense head on cached originals), method 2 (end to end with augmentation, replayed from the "
                    "cache; plus one real TensorFlow run that checks the replay), cached augmentation at each K "
                    "(equal steps and equal epochs) and the linear probe. Selection on one half of validation, "
                    "figures on the other, paired bootstrap tests. Writes report.md, results.json and plots; "
                    "resumable.")
    c.add_argument("--data", required=True)
    c.add_argument("--weights", default=d["weights"], help="default: %(default)s")
    c.add_argument("--input-size", type=int, default=d["input_size"], help="default: %(default)s")
    c.add_argument("--layer", help="extractor layer, e.g. block4_pool (default: block5_pool)")
    c.add_argument("--pooling", choices=["avg", "max"])
    c.add_argument("--copies", type=int, nargs="+", default=[0, 1, 2, 5, 10, 30], metavar="K",
                   help="K values of the cached arms (default: %(default)s)")
    c.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="head seeds (default: %(default)s)")
    c.add_argument("--epochs", type=int, default=d["epochs"], help="epochs of method 2 and every dense arm "
                                                                   "(default: %(default)s, the book's)")
    c.add_argument("--batch-size", type=int, default=d["batch_size"], help="default: %(default)s")
    c.add_argument("--learning-rate", type=float, default=d["learning_rate"], help="RMSprop (default: %(default)s)")
    c.add_argument("--policy", default=d["policy"], help="augmentation preset or JSON (default: %(default)s)")
    c.add_argument("--real-epochs", type=int, default=d["real_epochs"],
                   help="epochs of the one real TensorFlow method-2 run, 0 to skip (default: %(default)s)")
    c.add_argument("--no-logreg", action="store_true", help="skip the linear probe")
    c.add_argument("--no-equal-epochs", action="store_true", help="skip the equal-epochs cached arms")
    c.add_argument("--equal-epochs-max-k", type=int, metavar="K",
                   help="equal-epochs arms only up to this K (they cost (K+1)x method 2's steps; None: all)")
    c.add_argument("--extractor", help="reuse this exported extractor instead of exporting one (its metadata sets "
                                       "--weights, --input-size, --layer, --pooling and --precision)")
    c.add_argument("--preprocess", choices=["caffe", "rescale"], default=d["preprocess"],
                   help="the extractor's preprocessing, carried to the real TensorFlow run (default: %(default)s; a "
                        "reused --extractor's own metadata decides)")
    c.add_argument("--precision", choices=["fp32", "int8"], default=d["precision"],
                   help="run every arm on an fp32 or an int8 extractor (default: %(default)s)")
    c.add_argument("--calibration", metavar="DIR", help="images to calibrate --precision int8 on")
    c.add_argument("--store", help="reuse (and extend) this feature store")
    c.add_argument("--report-only", action="store_true",
                   help="write report.md from the arms saved so far in -o (an unfinished run), train nothing")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    c.add_argument("-o", "--output", required=True, help="report folder")
    c.set_defaults(func=run_compare_cmd)

    from convcache.pipeline.fit import FitConfig
    from convcache.protocol import FIT_DEFAULTS, FIT_DEFAULTS_SOURCE, parse_learning_rate

    fd = {f.name: f.default for f in fields(FitConfig)}
    src = "the study's answer, docs/results.md"
    f = sub.add_parser(
        "fit", help="photos -> a served model, with the study's recommended defaults (export, extract, train, fuse)",
        description="Export the extractor, extract the originals and K augmented copies, train the recommended "
                    "head (epoch and early stopping on one half of validation), fuse, and print the accuracy on "
                    "the other half with its 95% interval. Every stage's artifact stays under -o; a killed run "
                    f"resumes. The defaults are the answer of the study at convergence ({FIT_DEFAULTS_SOURCE}).")
    f.add_argument("--data", required=True, help="a folder with train/<class>/ and validation/<class>/ photos")
    f.add_argument("-o", "--output", required=True, help="output folder (model.onnx, and every stage's artifact)")
    f.add_argument("--weights", default=fd["weights"], help=f"VGG16 weights ({src})")
    f.add_argument("--input-size", type=int, default=fd["input_size"], help=f"square input side ({src})")
    f.add_argument("--preprocess", choices=["caffe", "rescale"], default=fd["preprocess"],
                   help=f"preprocessing inside the extractor ({src}, phase 1)")
    k = FIT_DEFAULTS["copies"]
    f.add_argument("--copies", type=int, default=None, metavar="K",
                   help=f"augmented copies per training photo (default: {k['logreg']} for the linear head, "
                        f"{k['dense']} for --head dense = method 2 replayed from the cache; {src})")
    f.add_argument("--policy", default=fd["policy"], help=f"augmentation preset or JSON ({src})")
    f.add_argument("--head", choices=["dense", "logreg"], default=fd["head"], help=f"head ({src})")
    f.add_argument("--standardize", action=argparse.BooleanOptionalAction, default=fd["standardize"],
                   help=f"dense: standardise the features, folded into the model ({src}, phase 1)")
    f.add_argument("--learning-rate", type=parse_learning_rate, default=fd["learning_rate"],
                   help=f"dense: RMSprop ({src}, phase 1), or 'auto': searched on your select half as the study did")
    f.add_argument("--max-epochs", type=int, default=fd["max_epochs"], help=f"dense: at most this many epochs ({src})")
    f.add_argument("--patience", type=int, default=fd["patience"],
                   help=f"dense: stop after this many epochs without a lower select-half loss ({src})")
    f.add_argument("--batch-size", type=int, default=fd["batch_size"], help="dense: batch size (the book's)")
    f.add_argument("--seed", type=int, default=fd["seed"], help="dense: initial weights, batch order, dropout")
    f.add_argument("--device", choices=["auto", "cpu", "cuda", "openvino"], default=fd["device"],
                   help="extraction runtime, as for extract")
    f.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    f.set_defaults(func=run_fit_cmd)


def run_compare_cmd(args) -> int:
    from convcache.pipeline.compare import CompareConfig, report_only, run_compare

    if args.report_only:
        results = report_only(args.output)
        print(f"reported {len(results['arms'])} finished arms -> {args.output}/report.md")
        return 0
    cfg = CompareConfig(data=args.data, output=args.output, weights=args.weights, input_size=args.input_size,
                        layer=args.layer, pooling=args.pooling, copies=args.copies, seeds=args.seeds,
                        epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate,
                        policy=args.policy, real_epochs=args.real_epochs, logreg=not args.no_logreg,
                        equal_epochs=not args.no_equal_epochs, equal_epochs_max_k=args.equal_epochs_max_k,
                        extractor=args.extractor, store=args.store, precision=args.precision,
                        calibration=args.calibration, preprocess=args.preprocess,
                        progress=not args.quiet)
    results = run_compare(cfg)
    for match, a in results.get("answer", {}).items():
        print(f"{match}: smallest K within the noise of method 2: {a['arm']} ({100 * a['diff']:+.1f} points)")
    print(f"compared {len(results['arms'])} arms -> {args.output}/report.md")
    return 0


def run_fit_cmd(args) -> int:
    from convcache.pipeline.fit import FitConfig, run_fit

    cfg = FitConfig(data=args.data, output=args.output, weights=args.weights, input_size=args.input_size,
                    preprocess=args.preprocess, copies=args.copies, policy=args.policy, head=args.head,
                    standardize=args.standardize, learning_rate=args.learning_rate, max_epochs=args.max_epochs,
                    patience=args.patience, batch_size=args.batch_size, seed=args.seed, device=args.device,
                    progress=not args.quiet)  # validated before anything heavy starts
    state = run_fit(cfg)
    from convcache.stats import accuracy_summary, small_half_warning

    res = state["result"]
    if "select" in res:
        s = res["select"]
        print(f"select half (chose the head's settings): {accuracy_summary(s['accuracy'], s['n'])}")
    r = res["report"]
    trained = (f"{state['epochs_run']} epochs, best {state['best_epoch']}" if state.get("epochs_run") else
               f"{cfg.head} head")
    print(f"wrote {state['model']}: {trained}")
    warning = small_half_warning("held-out half", r["n"])
    if warning:
        print(warning)
    print(f"held-out accuracy {accuracy_summary(r['accuracy'], r['n'])}")
    return 0
