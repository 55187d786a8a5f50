"""`grail-pipeline make-checkpoints`: a series of perturbed checkpoints to rehearse `mine --checkpoint-dir`.

This module reads the flags and prints the folders written; `tools.checkpoint_series` writes them.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from grail_pipeline.cli.arguments import nonnegative_float, nonnegative_int, positive_int
from grail_pipeline.common.errors import UserError
from grail_pipeline.inference.model_ref import DUMMY_PREFIX, PRESETS


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("make-checkpoints", help="write perturbed dummy checkpoints, one per window, to "
                                                       "rehearse mine --checkpoint-dir",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="dummy:tiny",
                   help="the base: a local checkpoint directory or a random-initialised preset, "
                        + ", ".join(DUMMY_PREFIX + name for name in PRESETS) + " (default dummy:tiny)")
    p.add_argument("--out", required=True, metavar="DIR", help="the checkpoint directory (mine --checkpoint-dir)")
    p.add_argument("--windows", default=None, metavar="LIST", help="window start blocks, e.g. 0,30,60")
    p.add_argument("--count", type=positive_int, default=None, help="N windows from --first-window, --every-blocks apart")
    p.add_argument("--first-window", type=nonnegative_int, default=0, metavar="BLOCK",
                   help="with --count: the first checkpoint's window start block (default 0)")
    p.add_argument("--every-blocks", type=positive_int, default=30, metavar="N",
                   help="with --count: blocks between checkpoints (default 30, one window)")
    p.add_argument("--noise", type=nonnegative_float, default=0.1,
                   help="noise per tensor, as a fraction of the tensor's standard deviation (default 0.1)")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="the noise's seed (same seed and window, same weights)")
    p.add_argument("--model-name", default=None, metavar="TEMPLATE",
                   help="metadata.json model_name, {window} replaced (default: the base's model_name)")
    p.add_argument("--ready-every", type=nonnegative_float, default=0.0, metavar="SECONDS",
                   help="wait this long before marking each next checkpoint ready (default 0: all at once), to "
                        "rehearse a checkpoint published while the miner runs")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from grail_pipeline.tools.checkpoint_series import SeriesPlan, windows_from, write_series

    logging.getLogger("grail_pipeline").setLevel(logging.INFO)
    if not args.out.strip():
        raise UserError("--out is empty (an unset shell variable?): name the checkpoint directory")
    windows = windows_from(args.windows, args.count, args.first_window, args.every_blocks)
    plan = SeriesPlan(args.model, Path(args.out).expanduser(), windows, noise=args.noise, seed=args.seed,
                      model_name=args.model_name, ready_every_s=args.ready_every)
    for path in write_series(plan):
        print(path, flush=True)
    return 0
