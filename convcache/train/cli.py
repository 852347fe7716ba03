"""`convcache train`, `reference`, `compare` and `fuse`."""

from __future__ import annotations


def register(sub) -> None:
    t = sub.add_parser("train", help="train a head on cached features",
                       description="Fit a head on a feature store (originals + the first K copies), export it to "
                                   "ONNX and write metrics.json beside it.")
    t.add_argument("--features", required=True, help="the .zarr store from `convcache extract`")
    t.add_argument("--head", choices=["logreg", "dense"], default="logreg")
    t.add_argument("--copies", type=int, default=None, metavar="K",
                   help="use originals + augmented copies 1..K (default: all stored)")
    t.add_argument("--C", type=float, nargs="+", help="logreg: candidate C values (chosen on validation)")
    t.add_argument("--epochs", type=int, default=30, help="dense: max epochs (early stopping on validation)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("-o", "--output", required=True, help="output folder for head.onnx and metrics.json")
    t.set_defaults(func=run_train)

    r = sub.add_parser("reference", help="end-to-end frozen-base TensorFlow training (the baseline)",
                       description="VGG16 frozen conv base + the dense head trained end to end with on-the-fly "
                                   "augmentation (same code and policy as extract).")
    r.add_argument("--data", required=True, help="root with train/ and validation/ class folders (or a CSV)")
    r.add_argument("--weights", default="hed", help="imagenet, hed, random or a weights file")
    r.add_argument("--epochs", type=int, default=3)
    r.add_argument("--no-augment", action="store_true", help="Chollet's setting without augmentation")
    r.add_argument("--fine-tune", choices=["block5"], help="then unfreeze block5 at a lower learning rate")
    r.add_argument("--fine-tune-epochs", type=int, default=2)
    r.add_argument("--input-size", type=int, default=150)
    r.add_argument("--layer", help="cut the base after this layer, as export does (default block5_pool)")
    r.add_argument("--pooling", choices=["avg", "max"])
    r.add_argument("--learning-rate", type=float, default=2e-5, help="RMSprop (Chollet: 2e-5)")
    r.add_argument("--batch-size", type=int, default=32)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("-o", "--output", required=True, help="output folder for metrics.json")
    r.set_defaults(func=run_reference_cmd)

    c = sub.add_parser("compare", help="cached heads vs the end-to-end reference, with a report",
                       description="Export, extract at several K, train both heads, run the reference with and "
                                   "without augmentation, and write report.md with a table and plots.")
    c.add_argument("--data", required=True)
    c.add_argument("--weights", default="hed")
    c.add_argument("--budget", choices=["tiny", "cpu", "full"], default="cpu",
                   help="tiny: a smoke run; cpu: K<=2, 3 reference epochs (2-core CPU); full: K<=10, 30 epochs")
    c.add_argument("--copies", type=int, nargs="+", help="override the budget's K values")
    c.add_argument("--epochs", type=int, help="override the budget's reference epochs")
    c.add_argument("--input-size", type=int, default=150)
    c.add_argument("--layer", help="extractor layer, e.g. block4_pool")
    c.add_argument("--pooling", choices=["avg", "max"])
    c.add_argument("--fine-tune", action="store_true", help="also run the reference with block5 fine-tuning")
    c.add_argument("--no-reference", action="store_true", help="skip the end-to-end runs")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("-o", "--output", required=True, help="report folder")
    c.set_defaults(func=run_compare_cmd)

    f = sub.add_parser("fuse", help="extractor + head -> one production ONNX model")
    f.add_argument("--extractor", required=True)
    f.add_argument("--head", required=True, help="a head folder from `convcache train` (or its head.onnx)")
    f.add_argument("-o", "--output", required=True)
    f.set_defaults(func=run_fuse)


def _acc(m: dict, split: str) -> str:
    return f"{100 * m[split]['accuracy']:.1f}%" if split in m else "n/a"


def run_train(args) -> int:
    from convcache.train.runner import train_head

    params = {"epochs": args.epochs, "seed": args.seed} if args.head == "dense" else {}
    if args.head == "logreg" and args.C:
        params["Cs"] = tuple(args.C)
    m = train_head(args.features, args.head, args.output, args.copies, params)
    print(f"trained {args.head} on {m['rows']['train']} rows in {m['fit_seconds']:.1f}s: validation "
          f"{_acc(m, 'validation')}, test {_acc(m, 'test')} -> {args.output}/head.onnx, metrics.json")
    return 0


def run_reference_cmd(args) -> int:
    from convcache.train.reference import run_reference

    m = run_reference(args.data, args.weights, args.output, args.epochs, not args.no_augment, args.input_size,
                      args.batch_size, args.seed, args.fine_tune, args.fine_tune_epochs,
                      learning_rate=args.learning_rate, layer=args.layer, pooling=args.pooling)
    print(f"reference ({'no ' if args.no_augment else ''}augmentation, {len(m['history'])} epochs) in "
          f"{m['fit_seconds']:.0f}s: validation {_acc(m, 'validation')}, test {_acc(m, 'test')} -> {args.output}")
    return 0


def run_compare_cmd(args) -> int:
    from convcache.train.compare import run_compare

    rows = run_compare(args.data, args.weights, args.output, args.budget, args.input_size, args.layer, args.pooling,
                       args.copies, args.epochs, args.fine_tune, references=not args.no_reference, seed=args.seed)
    print(f"compared {len(rows)} runs -> {args.output}/report.md")
    return 0


def run_fuse(args) -> int:
    from convcache.train.fuse import fuse

    meta = fuse(args.extractor, args.head, args.output)
    print(f"wrote {args.output}: pixels -> probabilities over {meta['classes']} ({meta['head']} head)")
    return 0
