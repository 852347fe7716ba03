"""`convcache compare`."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path


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
    c.add_argument("--device", choices=["auto", "cpu", "cuda", "openvino"], default=d["device"],
                   help="extraction runtime, as for extract (default: %(default)s)")
    _decoder_arg(c, d["decoder"])
    c.add_argument("--report-only", action="store_true",
                   help="write report.md from the arms saved so far in -o (an unfinished run), train nothing")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    c.add_argument("-o", "--output", required=True, help="report folder")
    c.set_defaults(func=run_compare_cmd)

    from convcache.pipeline.fit import FitConfig

    fd = {f.name: f.default for f in fields(FitConfig)}
    f = sub.add_parser(
        "fit", help="photos -> a served model: the layer(s), regularisation and copies chosen on your photos",
        description="Export one extractor with several taps, extract your photos (and augmented copies only while "
                    "they help, within --budget-rows), choose the representation, C and K by cross-fitting over "
                    "every labelled photo, refit on all of them, fuse, and print a held-out accuracy that no "
                    "choice saw (nested cross-fitting), with its 95% interval. Writes report.md/json/png. A killed "
                    "run resumes.")
    f.add_argument("--data", required=True, help="a folder of <class>/ folders, or train/<class>/ and "
                                                 "validation/<class>/ (pooled); a test/ split is only scored")
    f.add_argument("-o", "--output", required=True, help="output folder (model.onnx, report.md, every artifact)")
    f.add_argument("--weights", default=fd["weights"], help="VGG16 weights (default: %(default)s)")
    f.add_argument("--input-size", type=int, default=fd["input_size"], help="square input side (default: %(default)s)")
    f.add_argument("--preprocess", choices=["caffe", "rescale"], default=fd["preprocess"],
                   help="preprocessing inside the extractor (default: %(default)s)")
    f.add_argument("--taps", default=",".join(fd["taps"]), metavar="LAYER[:avg|max],...",
                   help="the extractor's taps, the representations to choose from (default: %(default)s)")
    f.add_argument("--budget-rows", type=int, default=fd["budget_rows"],
                   help="at most this many rows through the base: originals + copies of every photo "
                        "(default: %(default)s)")
    f.add_argument("--policy", default=fd["policy"], help="augmentation preset or JSON (default: %(default)s)")
    f.add_argument("--outer-folds", type=int, default=fd["outer_folds"], help="held-out estimate (default: 5)")
    f.add_argument("--inner-folds", type=int, default=fd["inner_folds"], help="selection (default: 3)")
    f.add_argument("--seed", type=int, default=fd["seed"], help="fold assignment (default: 0)")
    f.add_argument("--device", choices=["auto", "cpu", "cuda", "openvino"], default=fd["device"],
                   help="extraction runtime, as for extract")
    _decoder_arg(f, fd["decoder"])
    f.add_argument("-q", "--quiet", action="store_true", help="no progress")
    f.set_defaults(func=run_fit_cmd)


def _decoder_arg(p, default: str) -> None:
    from convcache.gpudecode import DECODERS

    p.add_argument("--decoder", choices=DECODERS, default=default,
                   help="JPEG decoding, as for extract: auto is nvjpeg (torchvision on the GPU) when extracting on "
                        "CUDA with torch and torchvision installed, else pillow (default: %(default)s)")


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
                        device=args.device, decoder=args.decoder, progress=not args.quiet)
    results = run_compare(cfg)
    for match, a in results.get("answer", {}).items():
        print(f"{match}: smallest K within the noise of method 2: {a['arm']} ({100 * a['diff']:+.1f} points)")
    print(f"compared {len(results['arms'])} arms -> {args.output}/report.md")
    return 0


def run_fit_cmd(args) -> int:
    from convcache.pipeline.fit import FitConfig, run_fit
    from convcache.stats import accuracy_summary

    cfg = FitConfig(data=args.data, output=args.output, weights=args.weights, input_size=args.input_size,
                    preprocess=args.preprocess, taps=tuple(t for t in args.taps.split(",") if t.strip()),
                    budget_rows=args.budget_rows, policy=args.policy, outer_folds=args.outer_folds,
                    inner_folds=args.inner_folds, seed=args.seed, device=args.device,
                    decoder=args.decoder, progress=not args.quiet)  # validated before anything heavy starts
    res = run_fit(cfg)["result"]
    c = res["choice"]
    print(f"wrote {res['model']}: {' + '.join(c['taps'])}, linear probe C={c['C']:g}, copies 0..{c['copies']}; "
          f"{res['rows_through_base']:,} rows through the base in {res['minutes']:.1f} min; report: "
          f"{Path(args.output) / 'report.md'}")
    if "test" in res:
        print(f"test/ photos: {accuracy_summary(res['test']['accuracy'], res['test']['n'])}")
    h = res["held_out"]
    print(f"held-out accuracy {accuracy_summary(h['accuracy'], h['n'])}")
    return 0
