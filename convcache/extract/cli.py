"""`convcache extract`."""

from __future__ import annotations

import sys

EXIT_PARTIAL = 3  # finished, but some files were skipped
SHOW = 50  # skipped and duplicate files listed at the end of a run (all: `convcache info STORE`)


def register(sub) -> None:
    from dataclasses import fields

    from convcache.extract.runner import ExtractConfig

    d = {f.name: f.default for f in fields(ExtractConfig)}

    p = sub.add_parser("extract", help="features of originals + K augmented copies into a Zarr cache",
                       description="Run an exported extractor over a dataset and its deterministic augmented "
                                   "copies, caching the features in a resumable, content-addressed Zarr store. "
                                   f"Exit status: 0 all files used, {EXIT_PARTIAL} finished with skipped files, "
                                   "2 bad arguments or input.")
    p.add_argument("--model", help="extractor .onnx from `convcache export` (required unless --verify)")
    p.add_argument("--data",
                   help="a root with train/ validation/ test/ class folders, one class-folder directory, "
                        "or a CSV manifest with path,label[,split]; local or a URL (s3://bucket/prefix/)")
    p.add_argument("-o", "--output", required=True,
                   help="the .zarr store to create or extend: a path or a URL (s3://bucket/x.zarr, gs://, memory://)")
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                   help="fsspec storage option for -o and --data URLs, repeatable (credentials and AWS_ENDPOINT_URL "
                        "also come from the environment)")
    p.add_argument("--augment", type=int, default=d["augment"], metavar="K", help="augmented copies per training image")
    p.add_argument("--augment-splits", default="train", help="comma-separated splits that get copies")
    p.add_argument("--policy", default="keras3",
                   help="augmentation: a preset (keras3: today's ImageDataGenerator; book: Keras 2.0.8 as the book "
                        "ran it) or JSON overrides, a file or a string, e.g. '{\"preset\": \"book\", "
                        "\"rotation_range\": 20}' (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d["seed"], help="augmentation seed: copy c of an image depends on it")
    p.add_argument("--batch-size", type=int, default=d["batch_size"],
                   help="images per inference call (default: by device, 256 on CUDA, 32 on CPU runtimes)")
    p.add_argument("--workers", type=int, default=None,
                   help="decode/augment workers (default: the cores this process may use)")
    p.add_argument("--decode-in", choices=["auto", "processes", "threads"], default=d["decode_in"],
                   help="where images are decoded: worker processes, or threads; auto = processes for 256+ "
                        "images and 4+ workers")
    p.add_argument("--decoder", choices=["auto", "pillow", "nvjpeg", "torchvision-cpu"], default=d["decoder"],
                   help="JPEG decoding: Pillow on the CPU, or torchvision's batched decoder: nvjpeg on the GPU (the "
                        "'nvjpeg' extra), torchvision-cpu for parity checks; auto = nvjpeg when extracting on "
                        "CUDA with torchvision installed, else Pillow. Recorded with the run's device: pixels "
                        "differ slightly, so a resume with another decoder is refused without --allow-mixed "
                        "(default: %(default)s)")
    p.add_argument("--decode-cache-mb", type=float, default=d["decode_cache_mb"],
                   help="memory for decoded images: kept for their later copies, so each is decoded once "
                        "per run, and decoded as they are hashed, up to 256 MiB of it "
                        "(default: %(default)s MiB; 150 px images take 66 KiB each)")
    p.add_argument("--exact", action="store_true",
                   help="CUDA: TF32 off, for parity runs (the math mode is recorded in the store's run log)")
    p.add_argument("--precision", choices=["fp32", "fp16"], default=d["precision"],
                   help="fp16: run the fp32 extractor in fp16, for CUDA (its cost to the task: export --precision "
                        "fp16 --probe DIR); recorded as the run's math mode, so a store is never silently mixed "
                        "(default: %(default)s)")
    p.add_argument("--allow-mixed", action="store_true",
                   help="extend a split whose rows were made on another provider or math mode (refused by "
                        "default: rows would not be bitwise comparable)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "openvino"], default=d["device"],
                   help="inference: ONNX Runtime on the CPU or CUDA, or the OpenVINO runtime (the 'openvino' extra); "
                        "auto = CUDA if present, else OpenVINO if installed, else CPU (`convcache info --runtime`); "
                        "a CUDA provider that is present but cannot start is an error, never a silent CPU run")
    p.add_argument("--dtype", choices=["float32", "float16"], default=d["dtype"], help="storage dtype")
    p.add_argument("--max-pixels", type=int, default=d["max_pixels"], help="skip images with more pixels (bomb guard)")
    p.add_argument("--max-bytes", type=int, default=d["max_bytes"],
                   help="skip files larger than this, before reading them (FIFOs and devices are always skipped)")
    p.add_argument("--chunk-rows", type=int, help="rows per Zarr chunk (None: about 4 MiB chunks)")
    p.add_argument("--rehash", action="store_true",
                   help="read and hash every file, trusting no cached hash (the stat cache, which lets a re-run "
                        "skip reading files whose size, mtime, ctime and inode, or ETag, are unchanged, is "
                        "written afresh)")
    g = p.add_argument_group("distributed (Dask)")
    g.add_argument("--scheduler", metavar="ADDRESS",
                   help="run decode + augment + inference on this Dask cluster (tcp://HOST:8786); the store and "
                        "the images must be reachable from the workers (object storage or a shared file system)")
    g.add_argument("--cluster", metavar="local:N", help="start a Dask LocalCluster with N worker processes")
    g.add_argument("--rows-per-task", type=int, help="rows per Dask task, rounded up to whole chunks (default: one "
                                                     "chunk)")
    g.add_argument("--threads", type=int, help="ONNX Runtime threads per session (default: all cores; with "
                                               "--cluster local:N, cores/N per worker)")
    p.add_argument("--verify", action="store_true",
                   help="check every committed block of -o against its digest and exit (0 intact, 2 damaged)")
    p.add_argument("--repair", action="store_true",
                   help="if -o is damaged, recompute the damaged rows (and those after them) from the images")
    p.add_argument("-q", "--quiet", "--no-progress", dest="no_progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _policy(text: str | None):
    from convcache.augment import AugmentPolicy

    return AugmentPolicy.parse(text)


def verify(output: str, storage_options: dict | None = None) -> int:
    from convcache.store.info import verify_store

    lines, damaged = verify_store(output, storage_options)
    print("\n".join(lines))
    if damaged:
        print(f"repair with: convcache extract --repair --model MODEL --data DATA -o {output}")
    return 2 if damaged else 0


def run(args) -> int:
    from convcache.errors import ConvcacheError
    from convcache.location import parse_storage_options

    options = parse_storage_options(args.storage_option)
    if args.verify:
        return verify(args.output, options)
    if not args.model or not args.data:
        raise ConvcacheError("--model and --data are required (except with --verify)")
    from convcache.extract.runner import ExtractConfig, run_extract
    cfg = ExtractConfig(model=args.model, data=args.data, output=args.output, augment=args.augment,
                        augment_splits=tuple(s.strip() for s in args.augment_splits.split(",") if s.strip()),
                        seed=args.seed, batch_size=args.batch_size, device=args.device,
                        **({"workers": args.workers} if args.workers is not None else {}),
                        decode_in=args.decode_in, decode_cache_mb=args.decode_cache_mb, exact=args.exact,
                        decoder=args.decoder,
                        allow_mixed=args.allow_mixed, precision=args.precision,
                        dtype=args.dtype, policy=_policy(args.policy),
                        max_pixels=args.max_pixels, chunk_rows=args.chunk_rows, max_bytes=args.max_bytes,
                        repair=args.repair, storage_options=options, scheduler=args.scheduler,
                        cluster=args.cluster, rows_per_task=args.rows_per_task, threads=args.threads,
                        progress=not args.no_progress, rehash=args.rehash)
    try:
        s = run_extract(cfg)
    except KeyboardInterrupt:
        print(f"\n{_committed(args.output, options)}; the same command resumes from there", file=sys.stderr)
        raise
    print(f"extracted {s.rows_written} rows ({s.rows_cached} cached, {s.inference_calls} inference calls) from "
          f"{s.images} files in {s.seconds:.1f}s, {s.rows_per_second:.1f} rows/s on {s.provider} ({s.math}, "
          f"batch {s.batch_size}); "
          f"{len(s.skipped)} skipped, {len(s.duplicates)} duplicates -> {args.output}")
    print(f"  files: {s.files_hashed} read and hashed, {s.files_from_stat_cache} unchanged (stat cache, not read)"
          + (f"; {s.decodes} decoded, in {s.decode_in}" if s.decode_in and s.decoder == "pillow" else "")
          + (f"; {s.decodes} decoded, {s.decoded_by_decoder} by {s.decoder} (the others by Pillow)"
             if s.decoder != "pillow" else ""))
    changed = {split: c for split, c in s.changes.items() if c}
    if changed:
        print("  listing: " + "; ".join(f"{split} {c}" for split, c in changed.items())
              + " (labels follow the folders now; gone photos are left out)")
    for kind, entries in (("skipped", s.skipped), ("duplicate", s.duplicates)):
        lines = sorted(entries.items())
        for path, what in lines[:SHOW]:
            print(f"  {kind} {path}: " + (what if kind == "skipped" else f"same content as {what}, used once"))
        if len(lines) > SHOW:
            print(f"  ... and {len(lines) - SHOW} more {kind} files (all of them: convcache info {args.output})")
    return EXIT_PARTIAL if s.skipped else 0


def _committed(output: str, options: dict) -> str:
    from convcache.store.info import committed_summary

    return committed_summary(output, options)
