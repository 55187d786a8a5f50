"""`grail-pipeline mine --dry-run`: the mining daemon, with a simulated chain and no upload.

This module reads the flags and environment, checks them before anything loads (one line and exit 2
for a mistake), turns a SIGTERM during start-up into a clean exit, and runs `mining.daemon.Daemon`,
which says what the daemon does.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anyio

from grail_pipeline.cli.arguments import (
    DEFAULT_BATCH_SIZES,
    add_runtime_arguments,
    apply_memory_cap,
    finite_float,
    nonnegative_float,
    path_or_default,
    positive_float,
    positive_int,
    whole_int,
)
from grail_pipeline.common.errors import UserError, find_in_group
from grail_pipeline.common.paths import ENV_CACHE, cache_root
from grail_pipeline.mining import rules
from grail_pipeline.mining.chain import (
    ENV_BLOCK_TIME,
    ENV_TOTAL_WORKERS,
    WindowClock,
    WorkerSlot,
    block_time_from_env,
    safety_blocks_from_env,
)
from grail_pipeline.mining.fill import FillOrder, resolve_target
from grail_pipeline.mining.settings import ENV_HOTKEYS, MineSettings, wallet_names
from grail_pipeline.mining.status import (
    StatusFile,
    default_status_path,
    hotkey_status_path,
    previous_windows,
    reconciled_windows,
    remove_stale_status_temporaries,
)
from grail_pipeline.protocol.profile import PROFILE

logger = logging.getLogger("grail_pipeline")

ENV_BATCH_SIZE = "GRAIL_GENERATION_BATCH_SIZE"
REDIS_START_WAIT_S = 15.0
QUEUE_FLAGS = ("generation_queue", "proof_queue", "sign_queue", "sink_queue", "sign_workers")
QUEUE_HELP = {"generation_queue": "problems waiting for a decode slot (a fleet worker keeps it short: claims held, "
                                  "not queued)",
              "proof_queue": "generated groups waiting for their proofs",
              "sign_queue": "proved groups waiting to be scored and signed",
              "sink_queue": "signed groups waiting for the window's file",
              "sign_workers": "threads scoring and signing groups"}
NOT_DRY_RUN = ("this tool does not talk to the chain: run `grail-pipeline mine --dry-run` to mine against a "
               "simulated chain (nothing is uploaded); use the GRAIL miner itself on mainnet")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("mine", help="the mining daemon against a simulated chain (--dry-run; no upload)",
                              description=__doc__.split("\n\n")[0])
    add_runtime_arguments(p, default_model="Qwen/Qwen2.5-3B-Instruct")
    p.add_argument("--dry-run", action="store_true",
                   help="required: mine against a simulated chain and write window files locally")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help=f"generation batch size (hf) or decode slots (fast); default ${ENV_BATCH_SIZE}, "
                        f"else {DEFAULT_BATCH_SIZES['hf'][0]} for hf and {DEFAULT_BATCH_SIZES['fast'][0]} for fast")
    p.add_argument("--out-dir", default=None, type=path_or_default("--out-dir", "using the default"),
                   help=f"where window files go (default ${ENV_CACHE}/windows or ~/.cache/grail-pipeline/windows)")
    p.add_argument("--status-file", default=None, type=path_or_default("--status-file", "using the default"),
                   help="JSON status (default <out-dir>/status-worker-<id>.json; with several hotkeys one file each, "
                        "<stem>-<hotkey>.json)")
    p.add_argument("--block-time", type=positive_float, default=None,
                   help=f"seconds per simulated block (default ${ENV_BLOCK_TIME}, else {PROFILE.block_time_s:g})")
    p.add_argument("--window-blocks", type=positive_int, default=PROFILE.window_length_blocks, metavar="N",
                   help=f"blocks per scoring window (default {PROFILE.window_length_blocks}, the protocol's); fewer "
                        "make short windows for rehearsals")
    p.add_argument("--run-seed", type=whole_int, default=0,
                   help="seed of the simulated block hashes and drand rounds (same seed, same problems)")
    p.add_argument("--genesis", type=finite_float, default=None, metavar="UNIX_TIME",
                   help="time of simulated block 0 (default: when mining starts); give every worker of a fleet "
                        "the same value so they share windows")
    p.add_argument("--drain-timeout", type=positive_float, default=60.0,
                   help="seconds a stop signal may spend finishing in-flight work before exiting anyway")
    p.add_argument("--verify-sample", type=whole_int, default=0, metavar="N",
                   help="re-verify N rollouts per window with the validator's method and log the pass rate (in a fleet, "
                        "the worker that writes the window's file checks it)")
    p.add_argument("--upload-allowance", type=nonnegative_float, default=None, metavar="SECONDS",
                   help="seconds reserved before each window's deadline for the upload a real miner makes (default: "
                        "the expected file's size at 100 Mbit/s, measured from the last file)")
    p.add_argument("--checkpoint-dir", default=None, metavar="DIR",
                   help="mine each window on its own checkpoint from DIR (replaces --model): one folder per checkpoint "
                        "with metadata.json (model_name, window), config, safetensors and tokenizer, complete once its "
                        "READY file exists (written last; a folder without it is ignored). Each window uses the "
                        "newest checkpoint ready before it opened and naming it or an earlier window, copied into "
                        "the engine's tensors (another architecture restarts the engine); no ready checkpoint at "
                        "start is an error. `grail-pipeline make-checkpoints` writes a series to rehearse")
    p.add_argument("--hotkeys", default=None, metavar="COLD/HOT[,COLD/HOT...]",
                   help=f"mine several hotkeys from one loaded model and engine (default ${ENV_HOTKEYS}; unset: the "
                        f"one of BT_WALLET_COLD/BT_WALLET_HOT): wallet names under BT_WALLET_PATH; each hotkey gets its "
                        f"own problems, signatures, window files and status file, filled in this order; with GRAIL_REDIS_URL "
                        f"every worker of the fleet names the same hotkeys and each hotkey's windows are shared")
    p.add_argument("--target-rollouts", default=None, metavar="N|cap",
                   help="rollouts per hotkey and window, at most: a whole number of groups of 16, or 'cap' for what "
                        "keeps the rolling 12-window total at the protocol's cap (5,120 a window; see "
                        "--failed-windows); the engine's time beyond every target is reported as spare capacity, not "
                        "mined. Default: 'cap' with several hotkeys, none with one or in a fleet (as many as the deadline "
                        "allows)")
    p.add_argument("--failed-windows", type=whole_int, default=0, metavar="K",
                   help="with --target-rollouts cap: plan for K of every 12 windows bringing nothing (a failed "
                        "upload, a late file), so each other window's target is the cap x 12 / (12 - K)")
    p.add_argument("--max-windows", type=positive_int, default=None, metavar="N",
                   help="stop after N complete windows (tests, rehearsals)")
    p.add_argument("--warmup-problems", type=whole_int, default=1, metavar="N",
                   help="untimed problems with short completions before the clock starts (every kernel compiled once)")
    p.add_argument("--log-level", choices=("debug", "info", "warning"), default="info",
                   help="debug adds one line per group handed to the sink")
    p.add_argument("--metrics-port", type=positive_int, default=None, metavar="PORT",
                   help="serve Prometheus metrics on http://ADDRESS:PORT/metrics (default: off); emit-pm2 gives "
                        "each worker its own port and writes the scrape configuration")
    p.add_argument("--metrics-address", default="127.0.0.1", metavar="ADDRESS",
                   help="the address the metrics server listens on (0.0.0.0: every interface, for a Prometheus "
                        "on another machine)")
    tuning = p.add_argument_group("pipeline tuning (defaults: the engine's)")
    for name in QUEUE_FLAGS:
        tuning.add_argument(f"--{name.replace('_', '-')}", type=positive_int, default=None, metavar="N",
                            help=QUEUE_HELP[name])
    p.set_defaults(func=run)


def default_out_dir(env: Mapping[str, str] = os.environ) -> Path:
    return cache_root(env) / "windows"


def resolve_settings(args: argparse.Namespace, env: Mapping[str, str] = os.environ) -> MineSettings:
    """Flags and environment checked up front, so every mistake is one line before a model loads."""
    worker = WorkerSlot.from_env(env)
    block_time = args.block_time if args.block_time is not None else block_time_from_env(env)
    rules.check_block_time(block_time, "--block-time" if args.block_time is not None else ENV_BLOCK_TIME)
    rules.check_drain_timeout(args.drain_timeout)
    if args.genesis is not None:
        rules.check_genesis(args.genesis, time.time())
    rules.check_window_blocks(args.window_blocks)
    rules.check_upload_allowance(args.upload_allowance, args.window_blocks, block_time)
    safety = safety_blocks_from_env(args.window_blocks, env)
    batch_size = args.batch_size
    if batch_size is None and env.get(ENV_BATCH_SIZE, "").strip():
        text = env[ENV_BATCH_SIZE].strip()
        batch_size = rules.parse_whole(text)
        if batch_size is None or batch_size < 1:
            raise UserError(f"{ENV_BATCH_SIZE}={text!r} must be a positive whole number")
    if args.verify_sample < 0:
        raise UserError("--verify-sample takes a number of rollouts, at least 0")
    if args.warmup_problems < 0:
        raise UserError("--warmup-problems cannot be negative")
    out_dir = Path(args.out_dir).expanduser() if args.out_dir else default_out_dir(env)
    status_file = Path(args.status_file).expanduser() if args.status_file else default_status_path(out_dir, worker.worker_id)
    from grail_pipeline.fleet.connection import redis_url_from_env  # the redis client: not for --help

    redis_url = redis_url_from_env(env)
    if redis_url is not None and getattr(args, "checkpoint_dir", None) is not None:
        raise UserError("--checkpoint-dir rotates checkpoints per window, which a fleet (GRAIL_REDIS_URL) does not "
                        "share yet: run the fleet on one --model")
    if worker.total_workers > 1 and redis_url is None:
        raise UserError(f"{worker.describe()}: the validator takes one file per hotkey and window, with groups "
                        f"0..N-1, so the workers of one hotkey must share their problem indices through a fleet "
                        f"(GRAIL_REDIS_URL); one worker per hotkey needs no {ENV_TOTAL_WORKERS}")
    wallets = wallet_names(getattr(args, "hotkeys", None), env)
    if len(wallets) > 1 and getattr(args, "checkpoint_dir", None) is not None:
        raise UserError("--checkpoint-dir restarts the engine between windows, which several hotkeys on one engine "
                        "do not follow yet: run one hotkey per process with --checkpoint-dir")
    # a fleet fills each hotkey's file from every worker's claims, so several hotkeys in a fleet get no default
    # target (the cap's default would stop one worker's window, as an explicit target would, refused below)
    target = resolve_target(getattr(args, "target_rollouts", None), getattr(args, "failed_windows", 0),
                            len(wallets) if redis_url is None else 1)
    if target is not None and redis_url is not None:
        raise UserError("--target-rollouts stops one worker's window; a fleet (GRAIL_REDIS_URL) fills one file "
                        "from every worker's claims: run the fleet without a target")
    overrides = {name: getattr(args, name) for name in QUEUE_FLAGS if getattr(args, name, None) is not None}
    return MineSettings(worker=worker, block_time_s=block_time, window_blocks=args.window_blocks,
                        safety_blocks=safety, run_seed=args.run_seed, genesis=args.genesis, out_dir=out_dir,
                        status_file=status_file, drain_timeout_s=args.drain_timeout,
                        verify_sample=args.verify_sample, max_windows=args.max_windows, batch_size=batch_size,
                        warmup_problems=args.warmup_problems, pipeline_overrides=overrides,
                        upload_allowance_s=args.upload_allowance, redis_url=redis_url, target_rollouts=target,
                        wallets=tuple(wallets))





class _StopDuringStartup(BaseException):
    """SIGTERM before the event loop took over the signals (model loading); a BaseException, like
    KeyboardInterrupt, so that no library's `except Exception` turns it into a load error."""


def _raise_stop(signum: int, frame: Any) -> None:
    raise _StopDuringStartup(signal.Signals(signum).name)


def _configure_logging(level: str) -> None:
    logger.setLevel(level.upper())
    for handler in logging.getLogger().handlers:
        if type(handler) is logging.StreamHandler:  # the command line's own handler, not a test harness's
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))


def run(args: argparse.Namespace) -> int:
    if not args.dry_run:
        raise UserError(NOT_DRY_RUN)
    previous = signal.signal(signal.SIGTERM, _raise_stop)  # until the event loop takes the signals over
    try:
        return _run(args)
    except BaseException as exc:
        if any(find_in_group(exc, kind) is not None for kind in (_StopDuringStartup, KeyboardInterrupt)):
            logger.info("stopped before mining started")
            return 0
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _run(args: argparse.Namespace) -> int:
    from grail_pipeline.mining.choices import resolve_choices
    from grail_pipeline.mining.daemon import Daemon
    from grail_pipeline.mining.runtime import Runtime
    from grail_pipeline.mining.sink import remove_stale_temporaries
    from grail_pipeline.protocol.wallet import load_signer, load_signers

    _configure_logging(args.log_level)
    settings = resolve_settings(args, os.environ)
    checkpoints, first = None, None
    if args.checkpoint_dir is not None:  # the model is the first window's checkpoint
        from grail_pipeline.mining.checkpoint_dir import CheckpointDir

        checkpoints = CheckpointDir(args.checkpoint_dir)
        clock = WindowClock(settings.block_time_s, settings.window_blocks, settings.safety_blocks, settings.run_seed,
                            settings.genesis)
        first = checkpoints.first(clock.next_generation_window(), time.time())
        args.model = str(first.path)
    choices = resolve_choices(args)  # the model and its checkpoint, lengths and engine, before the wallet and the load
    if note := apply_memory_cap(args):  # --memory-gb: the cap before anything allocates
        logger.warning(note)
    if settings.batch_size is not None:
        rules.check_batch_size(choices.engine_kind, settings.batch_size,
                               "--batch-size" if args.batch_size is not None else ENV_BATCH_SIZE)
    if settings.genesis is not None and (warning := rules.genesis_warning(settings.genesis, time.time())):
        logger.warning(warning)
    signers = load_signers(list(settings.wallets)) if settings.wallets else [load_signer(required=True)]
    signer = signers[0]
    try:
        settings.out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create --out-dir {settings.out_dir} ({exc.strerror or exc})") from None
    out_dir_locks = []  # held until the process ends
    if settings.redis_url is None:  # a fleet shares its out dir through Redis; a second solo daemon is refused
        from grail_pipeline.mining.out_dir_lock import lock_out_dir

        out_dir_locks = [lock_out_dir(settings.out_dir, s.ss58_address) for s in signers]  # noqa: F841
    paths = [settings.status_file] if len(signers) == 1 else [hotkey_status_path(settings.status_file, s.ss58_address)
                                                               for s in signers]
    statuses = [StatusFile(path, settings.worker.worker_id, settings.worker.total_workers, hotkey=s.ss58_address,
                           model=args.model, dry_run=True, target_rollouts=settings.target_rollouts,
                           hotkeys=[h.ss58_address for h in signers],
                           windows=reconciled_windows(settings.out_dir, s.ss58_address, previous_windows(path)))
                for s, path in zip(signers, paths)]
    status = statuses[0]
    for path, each in zip(paths, statuses):
        try:
            each.update(state="starting")
        except OSError as exc:
            raise UserError(f"cannot write the status file {path} ({exc.strerror or exc})") from None
    metrics = _serve_metrics(args, statuses, [s.ss58_address for s in signers], settings.worker.worker_id)
    removed = []
    for path, each in zip(paths, signers):
        logger.info("starting %s, hotkey %s, window files in %s, status in %s", settings.worker.describe(),
                    each.ss58_address, settings.out_dir, path)
        removed += remove_stale_temporaries(settings.out_dir, each.ss58_address)
        removed += remove_stale_status_temporaries(path)
    if settings.target_rollouts is not None:
        logger.info("target: %d rollouts per hotkey and window (%s), filled in the order %s", settings.target_rollouts,
                    "the cap" if args.target_rollouts in (None, "cap") else "--target-rollouts",
                    ", ".join(h.ss58_address for h in signers))
    if removed:
        logger.info("removed %d temporary file(s) a previous run of this worker left behind", len(removed))
    if settings.redis_url is not None:  # an unreachable fleet is one line before the model loads
        _wait_for_redis(settings.redis_url)
    runtime: Runtime | None = None
    daemon: Daemon | None = None
    try:
        if settings.redis_url is not None:  # another checkpoint or clock is refused before the model loads
            from grail_pipeline.mining.fleet_worker import check_fleet

            for each in signers:
                check_fleet(settings, each.ss58_address, choices.checkpoint)
        runtime = Runtime.from_choices(choices)
        batch_size = settings.batch_size or DEFAULT_BATCH_SIZES[runtime.engine_kind][0]
        runtime.check_batch_size(batch_size)
        logger.info("model %s on %s, %s engine, batch size %d, lengths %s", runtime.loaded.name,
                    runtime.loaded.device, runtime.engine_kind, batch_size, runtime.lengths.spec)
        engine = runtime.engine(batch_size)
        for each in statuses:
            each.update(engine=runtime.engine_kind, batch_size=batch_size)
        rotation = None
        if checkpoints is not None and first is not None:
            from grail_pipeline.mining.rotation import CheckpointRotation

            rotation = CheckpointRotation(checkpoints, first, lambda model: _engine_on(args, model, batch_size))
        fleets = []  # one per hotkey: each hotkey's windows are shared with that hotkey's other workers
        if settings.redis_url is not None:  # joined after the load: the context it publishes lives while it beats
            from grail_pipeline.fleet.member import worker_name
            from grail_pipeline.mining.fleet_worker import join_fleet

            name = worker_name()  # this process is one worker, under one name in every hotkey's fleet
            fleets = [join_fleet(settings, s.ss58_address, choices.checkpoint, name) for s in signers]
            for each, fleet in zip(statuses, fleets):
                each.update(fleet={"worker": fleet.worker, "checkpoint": fleet.context.checkpoint})
        fill = None if settings.target_rollouts is None else FillOrder([s.ss58_address for s in signers],
                                                                          settings.target_rollouts)
        if len(signers) > 1:
            from grail_pipeline.mining.hotkeys import HotkeysDaemon

            daemon = HotkeysDaemon(settings, runtime, signers, engine, batch_size, statuses, fill, fleets or None)
        else:
            daemon = Daemon(settings, runtime, signer, engine, batch_size, status, rotation,
                            fleet=fleets[0] if fleets else None)
            daemon.fill = fill
        if metrics is not None:
            metrics.daemon = daemon  # read when Prometheus scrapes (mining/metrics.py)
        code = anyio.run(daemon.main)
        # the event loop's signal handlers are gone: keep the last status write from being cut short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for unit in daemon.units:
            unit.status.update(state="stopped", exit_reason=daemon.stop_reason, windows_written=unit.windows_written,
                               open_windows={}, queue_depths={})
        return code
    except BaseException as exc:
        if any(find_in_group(exc, kind) is not None for kind in (_StopDuringStartup, KeyboardInterrupt)):
            for each in statuses:
                each.update(state="stopped", exit_reason="signal during start-up")
            raise
        user = find_in_group(exc, UserError)
        for each in statuses:
            each.update(state="stopped", exit_reason=f"error: {user or type(exc).__name__}")
        if user is not None:
            raise user from None
        raise
    finally:
        if runtime is not None:
            runtime.close()
        if daemon is not None and daemon.runtime is not runtime:  # restarted on another architecture
            daemon.runtime.close()


def _serve_metrics(args: argparse.Namespace, statuses: list[StatusFile], hotkeys: list[str], worker_id: int) -> Any:
    """--metrics-port: the worker's metrics served from now on, each hotkey's fed by its own status, the engine's
    labelled with the first hotkey (mining/metrics.py says why); None without the flag."""
    if args.metrics_port is None:
        return None
    from grail_pipeline.inference.loading import resolve_device
    from grail_pipeline.mining.metrics import MinerMetrics

    device = resolve_device(args.device)
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES") or ("cpu" if device.type == "cpu" else str(device))
    metrics = MinerMetrics(hotkeys[0], worker_id, gpu)
    for hotkey, status in zip(hotkeys, statuses, strict=True):
        metrics.watch(status, hotkey)
    metrics.serve(args.metrics_port, args.metrics_address)
    return metrics


def _wait_for_redis(url: str) -> None:
    """The fleet's Redis answers, or one line after `REDIS_START_WAIT_S`: under PM2 the server may start a moment
    after the workers (emit-pm2 puts it last, so that `pm2 stop` stops it after them)."""
    from grail_pipeline.fleet.connection import connect, redacted

    give_up = time.monotonic() + REDIS_START_WAIT_S
    while True:
        try:
            connect(url).close()
            return
        except UserError:
            if time.monotonic() >= give_up:
                raise
            logger.info("waiting for Redis at %s (up to %g s)", redacted(url), REDIS_START_WAIT_S)
            time.sleep(1.0)


def _engine_on(args: argparse.Namespace, model: str, batch_size: int) -> tuple[Any, Any]:
    """A runtime and engine on another checkpoint with the same choices (the rotation's engine restart)."""
    from grail_pipeline.mining.choices import resolve_choices
    from grail_pipeline.mining.runtime import Runtime

    runtime = Runtime.from_choices(resolve_choices(argparse.Namespace(**{**vars(args), "model": model})))
    runtime.check_batch_size(batch_size)
    return runtime, runtime.engine(batch_size)
