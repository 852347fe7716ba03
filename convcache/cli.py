"""One command line: `convcache <stage> ...`. Stage modules are imported lazily so that, for example,
`convcache serve` never imports TensorFlow."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from convcache import __version__
from convcache.errors import ConvcacheError

STAGE_CLIS = ["convcache.export.cli", "convcache.extract.cli", "convcache.train.cli", "convcache.serve.cli",
              "convcache.pipeline.cli"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convcache", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"convcache {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<stage>")
    for name in STAGE_CLIS:
        try:
            importlib.import_module(name).register(sub)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ConvcacheError as exc:
        print(f"convcache {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"convcache {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
