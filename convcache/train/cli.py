"""`convcache train`, `reference` and `fuse`."""

from __future__ import annotations

import sys

from convcache.protocol import BOOK_LEARNING_RATE, parse_learning_rate


def register(sub) -> None:
    t = sub.add_parser("train", help="train a head on cached features",
                       description="Fit a head on a feature store (originals + the first K copies), export it to "
                                   "ONNX and write metrics.json beside it.")
    t.add_argument("--features", required=True, help="the .zarr store from `convcache extract` (a path or a URL)")
    t.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                   help="fsspec storage option for a --features URL, repeatable")
    t.add_argument("--head", choices=["logreg", "dense", "logreg-stream"], default="logreg",
                   help="logreg-stream: the out-of-core linear probe (chosen by itself when the split does not fit "
                        "--memory-budget)")
    t.add_argument("--memory-budget", metavar="SIZE",
                   help="e.g. 4GB, 512MiB: if the train split's features would not fit, logreg streams them from "
                        "the store block by block (default: no budget, load in memory)")
    t.add_argument("--copies", type=int, default=None, metavar="K",
                   help="use originals + augmented copies 1..K (default: all stored)")
    t.add_argument("--C", type=float, nargs="+", help="logreg: candidate C values (chosen on the select half)")
    t.add_argument("--schedule", choices=["pool", "replay"], default="pool",
                   help="dense: pool = every epoch shuffles copies 0..K together; replay = epoch e trains on copy "
                        "(e mod K)+1 only, in the reference's batch order (with K >= epochs this is method 2) "
                        "(default: %(default)s)")
    t.add_argument("--epochs", type=int, default=30, help="dense: epochs (default: %(default)s)")
    t.add_argument("--batch-size", type=int, default=20, help="dense: batch size (default: %(default)s, the book's)")
    t.add_argument("--learning-rate", type=parse_learning_rate, default=BOOK_LEARNING_RATE,
                   help="dense: RMSprop, or 'auto': the protocol's search on the select-half loss (decades 2e-6..2e-3, "
                        "then half-decades around the best; docs/study_plan.md) (default: %(default)s)")
    t.add_argument("--steps-per-epoch", type=int,
                   help="dense: steps per epoch (default: one pass over the epoch's rows); with --schedule pool, "
                        "set it to replay's steps to match gradient steps")
    t.add_argument("--patience", type=int, help="dense: stop after this many epochs without a lower select-half "
                                                "loss (default: run every epoch, keep the best)")
    t.add_argument("--standardize", action="store_true",
                   help="dense: standardise the features (a scaler fit on the training originals, folded into "
                        "head.onnx); docs/results.md measured it")
    t.add_argument("--dropout", type=float, default=0.5, help="dense: dropout rate (default: %(default)s)")
    t.add_argument("--seed", type=int, default=0, help="dense: initial weights, batch order, dropout (default: 0)")
    t.add_argument("--train-top", choices=["block5"],
                   help="dense: also train VGG16's block5 (from the extractor's weights) on a store of cached "
                        "block4_pool maps: --epochs with block5 frozen, then --fine-tune-epochs with block5 "
                        "trainable at half the learning rate, as `reference --fine-tune block5` does end to end; "
                        "blocks 1-4 are the cache and never run")
    t.add_argument("--fine-tune-epochs", type=int, default=2, help="with --train-top (default: %(default)s)")
    t.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    t.add_argument("-o", "--output", required=True, help="output folder for head.onnx and metrics.json")
    t.set_defaults(func=run_train)

    from dataclasses import fields

    from convcache.train.config import ReferenceConfig

    d = {f.name: f.default for f in fields(ReferenceConfig)}
    r = sub.add_parser("reference", help="end-to-end frozen-base TensorFlow training (the baseline)",
                       description="VGG16 frozen conv base + the dense head trained end to end with on-the-fly "
                                   "augmentation: the book's method 2 (same decoding, augmentation code and "
                                   "protocol as the cached heads).")
    r.add_argument("--data", required=True, help="root with train/ and validation/ class folders (or a CSV)")
    r.add_argument("--weights", default=d["weights"], help="imagenet, hed, random or a weights file")
    r.add_argument("--epochs", type=int, default=d["epochs"], help="frozen-base epochs (the book: 30)")
    r.add_argument("--no-augment", action="store_true", help="the book's setting without augmentation")
    r.add_argument("--fine-tune", choices=["block5"], help="then unfreeze block5 at half the learning rate")
    r.add_argument("--unfreeze", choices=["all"], help="train every layer from the start: what not freezing "
                                                       "costs and gives (it cannot be cached)")
    r.add_argument("--fine-tune-epochs", type=int, default=d["fine_tune_epochs"], help="epochs of --fine-tune")
    r.add_argument("--input-size", type=int, default=d["input_size"], help="square input side")
    r.add_argument("--layer", help="cut the base after this layer, as export does (None: block5_pool)")
    r.add_argument("--pooling", choices=["avg", "max"], help="global pooling after the cut")
    r.add_argument("--learning-rate", type=float, default=d["learning_rate"], help="RMSprop (the book: 2e-5)")
    r.add_argument("--preprocess", choices=["caffe", "rescale"], default=d["preprocess"],
                   help="the extractor's preprocessing, as `export --preprocess` (default: %(default)s)")
    r.add_argument("--standardize", action="store_true",
                   help="standardise the features (statistics of the training originals) before the head")
    r.add_argument("--batch-size", type=int, default=d["batch_size"], help="the book: 20")
    r.add_argument("--policy", default=d["policy"], help="augmentation preset or JSON, as for extract")
    r.add_argument("--patience", type=int, help="stop after this many epochs without a lower select-half loss")
    r.add_argument("--dropout", type=float, default=d["dropout"], help="dropout rate of the head")
    r.add_argument("--seed", type=int, default=d["seed"], help="initial head weights, batch order, dropout, copies")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    r.add_argument("-o", "--output", required=True, help="output folder for metrics.json")
    r.set_defaults(func=run_reference_cmd)

    f = sub.add_parser("fuse", help="extractor + head -> one production ONNX model",
                       description="Join an extractor (`convcache export`) and a head trained on its features "
                                   "(`convcache train`) into one ONNX graph: pixels -> class probabilities and "
                                   "the features, served by `predict` and `serve` without TensorFlow. Refused "
                                   "when the head was trained on another extractor's features.")
    f.add_argument("--extractor", required=True, help="the extractor .onnx the head's store was extracted with")
    f.add_argument("--head", required=True, help="a head folder from `convcache train` (or its head.onnx)")
    f.add_argument("-o", "--output", required=True, help="the fused .onnx to write")
    f.set_defaults(func=run_fuse)


def _acc(m: dict, split: str) -> str:
    from convcache.stats import accuracy_summary

    return accuracy_summary(m[split]["accuracy"], int(m["rows"][split])) if split in m else "n/a"


def _halves(m: dict) -> str:
    """Both validation halves with n and a 95% interval (and test when there is one); warnings for small
    halves go to stderr."""
    from convcache.stats import small_half_warning

    for split, name in (("select", "select half"), ("report", "report half")):
        warning = small_half_warning(name, int(m["rows"][split])) if split in m else None
        if warning:
            print(warning, file=sys.stderr)
    parts = [f"select half (chose the epoch/C) {_acc(m, 'select')}", f"report half {_acc(m, 'report')}"]
    return "; ".join(parts + ([f"test {_acc(m, 'test')}"] if "test" in m else []))


def run_train(args) -> int:
    from convcache.errors import ConvcacheError
    from convcache.train.runner import train_head

    if args.seed < 0 or args.epochs < 1 or args.batch_size < 1:
        raise ConvcacheError("--seed must be >= 0, --epochs and --batch-size >= 1")
    if args.learning_rate == "auto" and (args.head != "dense" or args.train_top):
        raise ConvcacheError("--learning-rate auto searches the dense head's learning rate "
                             "(--head dense, no --train-top)")
    params = {"epochs": args.epochs, "seed": args.seed, "schedule": args.schedule, "batch_size": args.batch_size,
              "learning_rate": args.learning_rate, "steps_per_epoch": args.steps_per_epoch,
              "patience": args.patience, "dropout": args.dropout, "standardize": args.standardize,
              "progress": not args.quiet} if args.head == "dense" else {}
    if args.train_top:
        params["fine_tune_epochs"] = args.fine_tune_epochs
    if args.head != "dense" and args.C:
        params["Cs"] = tuple(args.C)
    from convcache.location import parse_bytes, parse_storage_options

    budget = parse_bytes(args.memory_budget, "--memory-budget") if args.memory_budget else None
    m = train_head(args.features, args.head, args.output, args.copies, params,
                   storage_options=parse_storage_options(args.storage_option), memory_budget=budget,
                   train_top=args.train_top)
    # --copies beyond the store's copies: train's data loading has warned (once) and used what there is
    if args.head == "dense" and args.schedule == "replay" and 0 < m["copies"] < m["epochs"]:
        print(f"note: replay over {m['copies']} copies for {m['epochs']} epochs repeats copies; method 2 would see "
              f"{m['epochs']} distinct copies (extract --augment {m['epochs']})")
    sched = f", {m['schedule']} schedule, {m['epochs']} epochs, {m['steps']} steps" if args.head == "dense" else ""
    if args.train_top:
        sched += f" (block5 trained on cached block4_pool maps, best: {m['selection']['best']['phase']})"
    print(f"trained {m['head']}{' (streamed from the store)' if m['streaming'] else ''} on {m['rows']['train']} "
          f"rows (copies 0..{m['copies']}{sched}) in "
          f"{m['fit_seconds']:.1f}s -> {args.output}/head.onnx, metrics.json")
    print(_halves(m))
    return 0


def run_reference_cmd(args) -> int:
    from convcache.train.config import ReferenceConfig

    cfg = ReferenceConfig(data=args.data, weights=args.weights, output=args.output, epochs=args.epochs,
                          augment=not args.no_augment, input_size=args.input_size, batch_size=args.batch_size,
                          seed=args.seed, fine_tune=args.fine_tune, fine_tune_epochs=args.fine_tune_epochs,
                          policy=args.policy, learning_rate=args.learning_rate, layer=args.layer,
                          pooling=args.pooling, patience=args.patience, dropout=args.dropout,
                          progress=not args.quiet, unfreeze=args.unfreeze, preprocess=args.preprocess,
                          standardize=args.standardize)  # validated before TensorFlow starts
    from convcache.train.reference import run_reference

    m = run_reference(cfg)
    if not m["cacheable"]:
        print("note: this run trains conv layers, so their outputs change every step: it cannot be replayed from a "
              "feature cache" + (" (only the frozen blocks below block5 could be)" if args.fine_tune else ""))
    print(f"reference ({'no ' if args.no_augment else ''}augmentation, {len(m['history'])} epochs, best "
          f"{m['best_epoch']}) in {m['fit_seconds']:.0f}s -> {args.output}")
    print(_halves(m))
    return 0


def run_fuse(args) -> int:
    from convcache.train.fuse import fuse

    meta = fuse(args.extractor, args.head, args.output)
    print(f"wrote {args.output}: pixels -> probabilities over {meta['classes']} ({meta['head']} head)")
    return 0
