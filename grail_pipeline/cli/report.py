"""`grail-pipeline report STATUS.json [...]`: the window timeline of a worker, or of a fleet, as a picture.

Reads `mine`'s status files (one, or every worker's of a fleet) and draws per window the on-time and cut
rollouts, the margin before the deadline, the GPU side's idle time and the checkpoint changes, one bar per
window and worker (tools/window_report.py); `--html` also writes one self-contained page with the picture and
the numbers.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from grail_pipeline.common.atomic import write_atomically
from grail_pipeline.common.errors import UserError
from grail_pipeline.mining.rules import check_writable


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("report", help="draw the window timeline of status files (a worker's, or a fleet's)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("status", nargs="+", metavar="STATUS.json",
                   help="mine's status file(s): <out-dir>/status-worker-<id>.json, one per worker")
    p.add_argument("--out", default=None, metavar="PNG",
                   help="the picture (default windows.png beside the first status file)")
    p.add_argument("--html", default=None, metavar="PATH",
                   help="also write one self-contained page: the picture (inlined) and the numbers per window")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from grail_pipeline.tools.pictures import png_bytes  # matplotlib: only for this command
    from grail_pipeline.tools.window_report import default_picture_path, html_page, load, timeline_figure

    workers = load(args.status)
    picture = Path(args.out).expanduser() if args.out else default_picture_path(args.status)
    check_writable(picture, "--out")
    if args.html:
        check_writable(args.html, "--html")
    png = png_bytes(timeline_figure(workers))
    try:
        write_atomically(picture, png)
        if args.html:
            page = html_page(workers, png, shlex.join(["grail-pipeline", *sys.argv[1:]]))
            write_atomically(Path(args.html).expanduser(), page.encode("utf-8"))
    except OSError as exc:
        raise UserError(f"cannot write the report ({exc.strerror or exc})") from None
    windows = sum(len(w.windows) for w in workers)
    print(f"{windows} window(s) of {len(workers)} worker(s): picture {picture}"
          + (f", page {args.html}" if args.html else ""))
    return 0
