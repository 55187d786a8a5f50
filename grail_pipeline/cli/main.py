"""The `grail-pipeline` command line: one module per job, each registering its subcommand here."""

from __future__ import annotations

import argparse
import codecs
import contextlib
import errno
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from grail_pipeline import __version__
from grail_pipeline.cli.arguments import HelpFormatter
from grail_pipeline.common.errors import UserError, find_in_group

# Each module provides `register(subparsers)`, which adds its parser and sets `func(args) -> int`.
COMMAND_MODULES: tuple[str, ...] = ("grail_pipeline.cli.benchmark", "grail_pipeline.cli.mine",
                                   "grail_pipeline.cli.verify", "grail_pipeline.cli.calibrate",
                                   "grail_pipeline.cli.emit_pm2", "grail_pipeline.cli.make_checkpoints",
                                   "grail_pipeline.cli.fleet_status", "grail_pipeline.cli.report")


class OneLineParser(argparse.ArgumentParser):
    """Bad flags end in one line on stderr and exit code 2, not a usage dump; help wraps at spaces only."""

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 - argparse's own signature
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="grail-pipeline",
        description="Fast, network-free GRAIL mining: benchmark, calibrate, emit a PM2 fleet, dry-run mine.",
        epilog="F = the GRAIL fork whose validator this tool's checks match (github.com/Agile-Ascent-Limited/Grail at "
               "c66a3e4): `verify` and the docs say \"F's rules\" for what that validator checks.",
    )
    parser.add_argument("--version", action="version", version=f"grail-pipeline {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def safe_streams() -> None:
    """What stdout and stderr cannot encode becomes '?' instead of a UnicodeEncodeError.

    Under an ASCII locale (LC_ALL=C with locale coercion off, PYTHONIOENCODING=ascii: common under PM2, cron and
    systemd) a table with '×' died mid-print, and a log line with it became logging's own traceback. UTF-8
    streams are left as they are."""
    for stream in (sys.stdout, sys.stderr):
        encoding = getattr(stream, "encoding", None) or "ascii"
        try:
            utf8 = codecs.lookup(encoding).name == "utf-8"
        except LookupError:
            utf8 = False
        if not utf8 and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush of what could not be written fails no more."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def configure_logging() -> None:
    """Log lines below WARNING on stdout, warnings and errors on stderr: under PM2 a worker's normal lines fill its
    out log and its err log holds what needs a look (everything went to stderr, the out log stayed empty)."""
    normal = logging.StreamHandler(sys.stdout)
    normal.addFilter(lambda record: record.levelno < logging.WARNING)
    problems = logging.StreamHandler(sys.stderr)
    problems.setLevel(logging.WARNING)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s", handlers=[normal, problems])


def main(argv: Sequence[str] | None = None) -> int:
    safe_streams()
    configure_logging()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        code = int(args.func(args) or 0)
        try:
            sys.stdout.flush()  # a write error of the output surfaces here, not in the interpreter's exit
        except OSError as exc:
            exc.filename = exc.filename or "standard output"
            raise
        return code
    except UserError as exc:
        print(f"grail-pipeline {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"grail-pipeline {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `grail-pipeline ... | head`: the reader has what it wanted
        _quiet_stdout()
        return 141  # what a process killed by SIGPIPE reports
    except (OSError, BaseExceptionGroup) as exc:  # a full disk, also inside the daemon's task groups
        full = find_in_group(exc, OSError)
        if full is None or full.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = full.filename or "standard output or a file"  # files written whole (common/atomic.py) are named
        print(f"grail-pipeline {args.command}: error: cannot write {where}: {full.strerror}", file=sys.stderr)
        _quiet_stdout()
        return 2
