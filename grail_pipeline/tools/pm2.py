"""The PM2 ecosystem file of a node: one miner per GPU, each with the batch size calibrated for its GPU kind.

Each GPU gets the batch size calibrated for its kind, so a node with mixed GPUs is served by one file.
Workers are numbered globally (node index × GPUs per node + position), so that the static split of
problem indices (GRAIL_WORKER_ID of GRAIL_TOTAL_WORKERS) covers every node without a coordinator.
Every value reaches the file through JSON encoding, which is valid JavaScript whatever it holds.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass
from importlib import resources

import jinja2

from grail_pipeline import __version__
from grail_pipeline.common.errors import UserError
from grail_pipeline.tools.calibration_file import CPU_KIND, Choice, engines_for, load_calibrations, read_choice

TEMPLATE = "ecosystem.config.js.j2"
TARGETS = ("grail", "dry-run")
NAME_PREFIX = {"grail": "grail-miner", "dry-run": "grail-dry-run"}
DEFAULT_DRAIN_S = 60.0  # the daemon's own --drain-timeout default
KILL_MARGIN_S = 15.0  # PM2 waits this much longer than the drain before SIGKILL
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
ENV_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MEMORY_RE = re.compile(r"[1-9][0-9]*[KMG]")
# emit-pm2 and every app agree on what GPU index N means: nvidia-smi's order, not CUDA's fastest-first.
DEVICE_ORDER = "PCI_BUS_ID"


@dataclass(frozen=True)
class Worker:
    """One PM2 app: a GPU, its calibration and its place in the fleet."""

    gpu: int
    choice: Choice
    worker_id: int


def parse_gpus(text: str) -> list[int]:
    parts = [p.strip() for p in text.split(",")]
    if not any(parts):
        raise UserError("--gpus is empty: list GPU indices, e.g. --gpus 0,1,2,3")
    gpus = []
    for part in parts:
        if not part.isdigit():
            raise UserError(f"--gpus takes GPU indices (whole numbers), got '{part}'")
        gpus.append(int(part))
    duplicates = sorted({g for g in gpus if gpus.count(g) > 1})
    if duplicates:
        raise UserError(f"--gpus lists GPU {', '.join(map(str, duplicates))} more than once")
    return gpus


def gpu_kinds(gpus: list[int] | None, kinds: str | None) -> list[tuple[int, str]]:
    """(index, kind) for each GPU: named by --gpu-kind, or detected here in nvidia-smi order."""
    if kinds is not None:
        if gpus is None:
            raise UserError("--gpu-kind needs --gpus to say which GPUs it names")
        names = [k.strip() for k in kinds.split(",")]
        if not all(names):
            raise UserError("--gpu-kind has an empty name")
        if len(names) == 1:
            names *= len(gpus)
        if len(names) != len(gpus):
            raise UserError(f"--gpu-kind gives {len(names)} names for {len(gpus)} GPUs: give one, or one per GPU")
        return list(zip(gpus, names, strict=True))
    if os.environ.get("CUDA_VISIBLE_DEVICES"):
        raise UserError("CUDA_VISIBLE_DEVICES is set, so detected GPU indices are not the node's: unset it, "
                        "or give --gpus and --gpu-kind")
    os.environ["CUDA_DEVICE_ORDER"] = DEVICE_ORDER
    import torch  # names and count need no CUDA context: the GPUs of a running fleet are left alone

    detected = {i: torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())}
    if not detected:
        raise UserError("no GPU detected here: give --gpus and --gpu-kind (the GPU name in the calibration file)")
    for gpu in gpus or []:
        if gpu not in detected:
            raise UserError(f"GPU {gpu} is not on this node (detected: {', '.join(map(str, sorted(detected)))})")
    return [(g, detected[g]) for g in (gpus if gpus is not None else sorted(detected))]


def pick_engine(target: str, requested: str | None, calibrated: list[str]) -> str:
    if requested is not None:
        return requested
    if target == "grail":
        return "hf"  # grail mine's GRAIL_GENERATION_BATCH_SIZE is its HF generate batch (at most 16)
    return "fast" if "fast" in calibrated else "hf"


def plan_workers(args: argparse.Namespace) -> list[Worker]:
    gpus = parse_gpus(args.gpus) if args.gpus is not None else None
    calibrations = load_calibrations(args.calibration)
    kinds = gpu_kinds(gpus, args.gpu_kind)
    per_node = args.gpus_per_node or len(kinds)
    if not 0 <= args.node_index < args.nodes:
        raise UserError(f"--node-index {args.node_index} is not in 0..{args.nodes - 1} (--nodes {args.nodes})")
    if len(kinds) != per_node:
        raise UserError(f"{len(kinds)} GPU(s) here but --gpus-per-node {per_node}: every node must run "
                        f"--gpus-per-node workers, or some problem indices would never be mined")
    first = args.node_index * per_node
    return [Worker(gpu, read_choice(calibrations, args.calibration, kind,
                                    pick_engine(args.target, args.engine, engines_for(calibrations, kind))),
                   first + position)
            for position, (gpu, kind) in enumerate(kinds)]


def parse_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not ENV_KEY_RE.fullmatch(key):
            raise UserError(f"--env takes KEY=VALUE with a shell variable name as KEY, got '{pair}'")
        env[key] = value
    return env


def _check_flags(args: argparse.Namespace) -> None:
    if not args.wallet_cold or not args.wallet_hot:
        raise UserError("the miner needs a wallet: give --wallet-cold and --wallet-hot "
                        "(or set BT_WALLET_COLD and BT_WALLET_HOT)")
    if args.name_prefix is not None and not NAME_RE.fullmatch(args.name_prefix):
        raise UserError(f"--name-prefix '{args.name_prefix}' must be letters, digits, '.', '_' or '-' "
                        f"(it names log files)")
    if not MEMORY_RE.fullmatch(args.max_memory_restart):
        raise UserError(f"--max-memory-restart takes a size like 80G or 512M, got '{args.max_memory_restart}'")
    if args.target == "grail" and (args.out_dir, args.block_time, args.genesis) != (None, None, None):
        raise UserError("--out-dir, --block-time and --genesis are for --target dry-run")


def _env(args: argparse.Namespace, worker: Worker, total: int, extra: dict[str, str]) -> dict[str, str]:
    flash = args.flash_attention or ("1" if worker.choice.attention == "flash_attention_2" else "0")
    env = dict(CUDA_DEVICE_ORDER=DEVICE_ORDER, CUDA_VISIBLE_DEVICES=str(worker.gpu),
               GRAIL_WORKER_ID=str(worker.worker_id), GRAIL_TOTAL_WORKERS=str(total),
               GRAIL_GENERATION_BATCH_SIZE=str(worker.choice.batch_size), GRAIL_USE_FLASH_ATTENTION=flash,
               GRAIL_MINER_SAFETY_BLOCKS=str(args.safety_blocks), BT_WALLET_COLD=args.wallet_cold,
               BT_WALLET_HOT=args.wallet_hot, TOKENIZERS_PARALLELISM="false")
    if args.wallet_path:
        env["BT_WALLET_PATH"] = os.path.abspath(os.path.expanduser(args.wallet_path))
    if args.block_time is not None:
        env["GRAIL_BLOCK_TIME"] = f"{args.block_time:g}"
    return {**env, **extra}


def _command(args: argparse.Namespace, cwd: str, worker: Worker, genesis: float) -> tuple[str, list[str]]:
    """The executable and its arguments (PM2 runs it as is: interpreter 'none')."""
    if args.target == "grail":
        return os.path.join(cwd, os.path.expanduser(args.grail_bin)), ["mine"]
    choice = worker.choice
    out_dir = os.path.join(cwd, os.path.expanduser(args.out_dir or "dry-run"))
    command = ["-m", "grail_pipeline", "mine", "--dry-run", "--model", choice.model, "--engine", choice.engine,
               "--max-new-tokens", str(choice.max_new_tokens), "--max-prompt-tokens", str(choice.max_prompt_tokens),
               "--length-profile", choice.length_profile,
               "--out-dir", out_dir, "--drain-timeout", f"{args.drain_timeout:g}", "--genesis", f"{genesis:.3f}"]
    if choice.gpu == CPU_KIND:
        command += ["--device", "cpu"]
    return sys.executable, command


def build_context(args: argparse.Namespace) -> dict:
    """Everything the template needs, validated."""
    _check_flags(args)
    extra = parse_env(args.env)
    workers = plan_workers(args)
    total = args.nodes * len(workers)
    cwd = os.path.abspath(os.path.expanduser(args.cwd or os.getcwd()))
    log_dir = os.path.join(cwd, os.path.expanduser(args.log_dir or "logs"))
    prefix = args.name_prefix or NAME_PREFIX[args.target]
    genesis = time.time() if args.genesis is None else args.genesis
    apps = []
    for worker in workers:
        script, script_args = _command(args, cwd, worker, genesis)
        name = f"{prefix}-{worker.worker_id}"
        apps.append(dict(name=name, script=script, args=script_args, cwd=cwd,
                         env=_env(args, worker, total, extra), gpu_kind=worker.choice.gpu,
                         engine=worker.choice.engine,
                         kill_timeout_ms=round((args.drain_timeout + KILL_MARGIN_S) * 1000),
                         max_memory_restart=args.max_memory_restart,
                         out_file=os.path.join(log_dir, f"{name}.out.log"),
                         error_file=os.path.join(log_dir, f"{name}.err.log")))
    if args.target == "grail" and not os.path.exists(apps[0]["script"]):
        print(f"grail-pipeline emit-pm2: warning: {apps[0]['script']} does not exist here", file=sys.stderr)
    return dict(version=__version__, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), target=args.target,
                command=shlex.join(["grail-pipeline", *sys.argv[1:]]), calibration=args.calibration,
                node_index=args.node_index, nodes=args.nodes, total_workers=total, log_dir=log_dir, apps=apps)


def render(context: dict) -> str:
    """The template, installed as package data (grail_pipeline.templates), filled in."""
    source = resources.files("grail_pipeline.templates").joinpath(TEMPLATE).read_text(encoding="utf-8")
    env = jinja2.Environment(autoescape=False, undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True, keep_trailing_newline=True)
    return env.from_string(source).render(**context)
