"""The `grail-pipeline` command line: one subcommand module per job, registered here."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from grail_pipeline import __version__
from grail_pipeline.errors import UserError

# Each module (grail_pipeline.<name>) provides `register(subparsers)`, which adds its parser and sets `func(args) -> int`.
COMMAND_MODULES: tuple[str, ...] = ()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grail-pipeline",
        description="Fast, network-free GRAIL mining: benchmark, calibrate, emit a PM2 fleet, dry-run mine.",
    )
    parser.add_argument("--version", action="version", version=f"grail-pipeline {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"grail_pipeline.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"grail-pipeline {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
