"""`grail-pipeline emit-pm2`: a PM2 ecosystem file with one miner per GPU, from calibration.yaml.

The file is `tools.pm2`'s; this module reads the flags and writes the rendered file to stdout, or to --out
atomically (a failed run leaves the old file as it was; `> file` would leave it empty, which the error says).
For dry-run workers it also writes the Prometheus scrape configuration of their metrics beside it.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys

from grail_pipeline.cli.arguments import (
    finite_float,
    nonnegative_int,
    path_or_default,
    positive_float,
    positive_int,
    whole_int,
)
from grail_pipeline.common.atomic import write_atomically
from grail_pipeline.common.errors import UserError
from grail_pipeline.tools.pm2 import (
    DEFAULT_DRAIN_S,
    DEFAULT_METRICS_PORT,
    KILL_MARGIN_S,
    NAME_PREFIX,
    SCRAPE_FILE,
    SCRAPE_TEMPLATE,
    TARGETS,
    build_context,
    render,
    scrape_config_path,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("emit-pm2", help="print a PM2 ecosystem file: one miner per GPU, batch size per GPU kind",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--calibration", default="calibration.yaml", metavar="PATH", help="written by `calibrate`")
    p.add_argument("--target", choices=TARGETS, default="grail",
                   help="grail = the production `grail mine`; dry-run = `grail-pipeline mine --dry-run` (a rehearsal)")
    p.add_argument("--gpus", default=None, help="comma list of GPU indices (nvidia-smi order); default every GPU")
    p.add_argument("--gpu-kind", default=None, metavar="NAME[,NAME...]",
                   help="the calibration entry of each listed GPU (one name for all) when they are not detected "
                        "here, e.g. when writing another node's file; on a box without a GPU: --gpus 0 --gpu-kind cpu")
    p.add_argument("--engine", choices=("hf", "fast"), default=None,
                   help="which calibration to use; default hf for grail (its batch size is HF generate's), "
                        "for dry-run fast where calibrated, else hf")
    p.add_argument("--node-index", type=whole_int, default=0, help="this node's index, 0-based")
    p.add_argument("--nodes", type=positive_int, default=1, help="nodes in the fleet")
    p.add_argument("--gpus-per-node", type=positive_int, default=None,
                   help="GPUs (workers) on every node; default the number of GPUs here")
    p.add_argument("--wallet-cold", default=os.environ.get("BT_WALLET_COLD"), help="default $BT_WALLET_COLD")
    p.add_argument("--wallet-hot", default=os.environ.get("BT_WALLET_HOT"), help="default $BT_WALLET_HOT")
    p.add_argument("--hotkeys", default=None, metavar="COLD/HOT[,COLD/HOT...]",
                   help="dry-run target: several hotkeys from one engine per GPU (wallet names, never keys), dealt to "
                        "the GPUs in order; every app mines its own (GRAIL_HOTKEYS), alone, no fleet")
    p.add_argument("--fleet-hotkeys", default=None, metavar="COLD/HOT[,COLD/HOT...]",
                   help="dry-run target: every worker of the fleet (every GPU of every node) mines all these hotkeys "
                        "from its own engine (GRAIL_HOTKEYS with GRAIL_REDIS_URL), each hotkey's windows shared "
                        "through Redis; instead of --wallet-cold/--wallet-hot, no target")
    p.add_argument("--hotkeys-per-gpu", type=positive_int, default=None, metavar="N",
                   help="with --hotkeys: hotkeys per GPU (default as evenly as they go; `benchmark` and `calibrate` "
                        "say how many caps a GPU fills)")
    p.add_argument("--target-rollouts", default=None, metavar="N|cap",
                   help="with --hotkeys: mine's --target-rollouts (default: its own, the cap with several hotkeys)")
    p.add_argument("--failed-windows", type=nonnegative_int, default=None, metavar="K",
                   help="with --hotkeys: mine's --failed-windows")
    p.add_argument("--wallet-path", default=os.environ.get("BT_WALLET_PATH"),
                   help="default $BT_WALLET_PATH (unset: the miner's ~/.bittensor/wallets)")
    p.add_argument("--safety-blocks", type=nonnegative_int, default=None,
                   help="GRAIL_MINER_SAFETY_BLOCKS: no problem starts in a window's last N blocks (0 to 29); default "
                        "6 for --target grail (the fork's production configs: its only stop rule) and 0 for "
                        "--target dry-run (our daemon stops by its measured deadline plan; N adds margin)")
    p.add_argument("--flash-attention", choices=("0", "1"), default=None,
                   help="GRAIL_USE_FLASH_ATTENTION; default what the calibration ran with")
    p.add_argument("--cwd", default=None, type=path_or_default("--cwd", "using the current directory"), help="working directory of every app; default the current one")
    p.add_argument("--log-dir", default=None, type=path_or_default("--log-dir", "using <cwd>/logs"), help="PM2 log files; default <cwd>/logs")
    p.add_argument("--name-prefix", default=None, help="app names are <prefix>-<worker id>; default "
                   + " / ".join(f"{NAME_PREFIX[t]} ({t})" for t in TARGETS))
    p.add_argument("--max-memory-restart", default="80G",
                   help="PM2 restarts a worker whose host memory (RSS) passes this, e.g. 80G (the fork's value)")
    p.add_argument("--drain-timeout", type=positive_float, default=DEFAULT_DRAIN_S,
                   help="seconds a stopping worker gets to finish; PM2's kill_timeout is this plus "
                        f"{KILL_MARGIN_S:g} s")
    p.add_argument("--grail-bin", default=".venv/bin/grail",
                   help="grail target: F's miner (`grail mine`, installed from github.com/Agile-Ascent-Limited/Grail; "
                        "deploy/README.md step 3), relative to --cwd")
    p.add_argument("--out-dir", default=None, help="dry-run target: window and status files; default <cwd>/dry-run")
    p.add_argument("--block-time", type=positive_float, default=None,
                   help="dry-run target: seconds per simulated block (GRAIL_BLOCK_TIME; the daemon's default 12)")
    p.add_argument("--genesis", type=finite_float, default=None, metavar="UNIX_TIME",
                   help="dry-run target: time of simulated block 0, shared by every worker so they mine the same "
                        "windows; default now (give every node's file the same value)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for every app, e.g. OMP_NUM_THREADS=8 (repeatable)")
    p.add_argument("--redis-url", default=None, metavar="URL",
                   help="GRAIL_REDIS_URL of every worker, for a fleet of several workers of one hotkey (or of each of --fleet-hotkeys) (default on one "
                        "node: redis://127.0.0.1:6379/0; several nodes must give the hub's, the same on every node)")
    p.add_argument("--redis-node", type=whole_int, default=0, help="the node whose file runs the fleet's Redis (default 0)")
    p.add_argument("--redis-app", action=argparse.BooleanOptionalAction, default=True,
                   help="an app for redis-server on --redis-node (--no-redis-app: you run the server yourself)")
    p.add_argument("--redis-server", default=None, metavar="PATH", help="the redis-server binary (default: on PATH)")
    p.add_argument("--out", default=None, metavar="PATH", type=path_or_default("--out", "printing to stdout"),
                   help="write the file here, whole or not at all (default stdout)")
    p.add_argument("--metrics-port", type=nonnegative_int, default=None, metavar="PORT",
                   help=f"dry-run target: the first worker's Prometheus metrics port, the next ones count up "
                        f"(default {DEFAULT_METRICS_PORT}; 0: no metrics); the scrape configuration for them is "
                        f"written as {SCRAPE_FILE} beside --out (or in --cwd with stdout)")
    p.add_argument("--metrics-host", default="127.0.0.1", metavar="HOST",
                   help="dry-run target: the name or address Prometheus reaches this node at (the scrape "
                        "configuration's targets); another than 127.0.0.1 makes the workers listen on every interface")
    p.add_argument("--scrape-interval", type=positive_float, default=15.0, metavar="SECONDS",
                   help="dry-run target: how often Prometheus scrapes the workers (default 15)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        context = build_context(args)
        text = render(context)
    except UserError as exc:
        if args.out is None and _stdout_is_a_file():
            raise UserError(f"{exc} (nothing was written: the file stdout goes to is left empty; "
                            f"--out PATH keeps the previous file)") from None
        raise
    if args.out is None:
        sys.stdout.write(text)
    else:
        try:
            write_atomically(os.path.expanduser(args.out), text.encode("utf-8"))
        except OSError as exc:
            raise UserError(f"cannot write --out {args.out} ({exc.strerror or exc})") from None
    if any(app["metrics_port"] is not None for app in context["apps"]):
        path = scrape_config_path(args.out, context["apps"][0]["cwd"])
        try:
            write_atomically(path, render(context, SCRAPE_TEMPLATE).encode("utf-8"))
        except OSError as exc:
            raise UserError(f"cannot write the scrape configuration {path} ({exc.strerror or exc})") from None
        print(f"grail-pipeline emit-pm2: Prometheus scrape configuration for the workers' metrics: {path}",
              file=sys.stderr)
    return 0


def _stdout_is_a_file() -> bool:
    try:
        return stat.S_ISREG(os.fstat(sys.stdout.fileno()).st_mode)
    except (OSError, ValueError, AttributeError):  # captured or closed stdout: no file to speak of
        return False
