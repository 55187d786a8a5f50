"""`grail-pipeline mine --dry-run`: the mining daemon, with a simulated chain and no upload.

Behaves like a miner in every way except that it talks to no chain and uploads nothing: a
WindowClock stands in for the chain (blocks from elapsed time, per-window block hash and drand
derived from --run-seed), a ProblemSource issues this worker's problems of each window while it is
open, the same pipeline the benchmark measures generates, proves and signs them, and a WindowSink
writes one atomic Parquet file per window and worker. SIGINT/SIGTERM (what PM2 sends) stops intake,
drains the in-flight work into the current window's file (marked partial) and exits 0 within
--drain-timeout; a second signal exits at once. A JSON status file tells a health check what the
daemon is doing.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import anyio
from anyio.abc import ObjectReceiveStream, ObjectSendStream, TaskGroup, TaskStatus

from grail_pipeline.cli.benchmark import (
    WARMUP_INDEX_OFFSET,
    WARMUP_MAX_TOKENS,
    BatchResult,
    BenchmarkSink,
    benchmark_tasks,
    benchmark_window,
    find_user_error,
    verify_sample,
)
from grail_pipeline.common.errors import UserError
from grail_pipeline.common.paths import ENV_CACHE, cache_root
from grail_pipeline.inference.engine import Engine
from grail_pipeline.mining.chain import (
    ENV_BLOCK_TIME,
    ProblemSource,
    WindowClock,
    WorkerSlot,
    block_time_from_env,
    safety_blocks_from_env,
)
from grail_pipeline.mining.messages import ProblemTask, WindowContext, make_task
from grail_pipeline.mining.pipeline import Pipeline, PipelineConfig
from grail_pipeline.mining.runtime import (
    DEFAULT_BATCH_SIZES,
    Runtime,
    add_runtime_arguments,
    positive_float,
    positive_int,
)
from grail_pipeline.mining.sink import WindowReport, WindowSink, remove_stale_temporaries
from grail_pipeline.mining.status import (
    StatusFile,
    default_status_path,
    remove_stale_status_temporaries,
)
from grail_pipeline.protocol.profile import PROFILE
from grail_pipeline.protocol.wallet import Signer, load_signer

logger = logging.getLogger("grail_pipeline")

ENV_BATCH_SIZE = "GRAIL_GENERATION_BATCH_SIZE"
QUEUE_FLAGS = ("generation_queue", "proof_queue", "sign_queue", "sink_queue", "sign_workers")
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
    p.add_argument("--out-dir", default=None,
                   help=f"where window files go (default ${ENV_CACHE}/windows or ~/.cache/grail-pipeline/windows)")
    p.add_argument("--status-file", default=None, help="JSON status (default <out-dir>/status-worker-<id>.json)")
    p.add_argument("--block-time", type=positive_float, default=None,
                   help=f"seconds per simulated block (default ${ENV_BLOCK_TIME}, else {PROFILE.block_time_s:g})")
    p.add_argument("--window-blocks", type=positive_int, default=PROFILE.window_length_blocks)
    p.add_argument("--run-seed", type=int, default=0,
                   help="seed of the simulated block hashes and drand rounds (same seed, same problems)")
    p.add_argument("--genesis", type=float, default=None, metavar="UNIX_TIME",
                   help="time of simulated block 0 (default: when mining starts); give every worker of a fleet "
                        "the same value so they share windows")
    p.add_argument("--drain-timeout", type=positive_float, default=60.0,
                   help="seconds a stop signal may spend finishing in-flight work before exiting anyway")
    p.add_argument("--verify-sample", type=int, default=0, metavar="N",
                   help="re-verify N rollouts per window with the validator's method and log the pass rate")
    p.add_argument("--max-windows", type=positive_int, default=None,
                   help="stop after N complete windows (tests, rehearsals)")
    p.add_argument("--warmup-problems", type=int, default=1,
                   help=f"untimed problems before the clock starts (lengths capped at {WARMUP_MAX_TOKENS} tokens)")
    p.add_argument("--log-level", choices=("debug", "info", "warning"), default="info",
                   help="debug adds one line per group handed to the sink")
    tuning = p.add_argument_group("pipeline tuning (defaults: the engine's)")
    for name in QUEUE_FLAGS:
        tuning.add_argument(f"--{name.replace('_', '-')}", type=positive_int, default=None)
    p.set_defaults(func=run)


def default_out_dir(env: Mapping[str, str] = os.environ) -> Path:
    return cache_root(env) / "windows"


@dataclass(frozen=True)
class MineSettings:
    """Everything the daemon needs besides the model, resolved from flags and environment."""

    worker: WorkerSlot
    block_time_s: float
    window_blocks: int
    safety_blocks: int
    run_seed: int
    genesis: float | None
    out_dir: Path
    status_file: Path
    drain_timeout_s: float
    verify_sample: int
    max_windows: int | None
    batch_size: int | None  # None: the engine's default
    warmup_problems: int
    pipeline_overrides: dict[str, int]

    @property
    def window_seconds(self) -> float:
        return self.window_blocks * self.block_time_s


def resolve_settings(args: argparse.Namespace, env: Mapping[str, str] = os.environ) -> MineSettings:
    """Flags and environment checked up front, so every mistake is one line before a model loads."""
    worker = WorkerSlot.from_env(env)
    block_time = args.block_time if args.block_time is not None else block_time_from_env(env)
    safety = safety_blocks_from_env(args.window_blocks, env)
    batch_size = args.batch_size
    if batch_size is None and env.get(ENV_BATCH_SIZE, "").strip():
        text = env[ENV_BATCH_SIZE].strip()
        if not text.isdigit() or int(text) < 1:
            raise UserError(f"{ENV_BATCH_SIZE}={text!r} must be a positive whole number")
        batch_size = int(text)
    if args.verify_sample < 0:
        raise UserError("--verify-sample takes a number of rollouts, at least 0")
    if args.warmup_problems < 0:
        raise UserError("--warmup-problems cannot be negative")
    out_dir = Path(args.out_dir).expanduser() if args.out_dir else default_out_dir(env)
    status_file = Path(args.status_file).expanduser() if args.status_file else default_status_path(out_dir, worker.worker_id)
    overrides = {name: getattr(args, name) for name in QUEUE_FLAGS if getattr(args, name, None) is not None}
    return MineSettings(worker=worker, block_time_s=block_time, window_blocks=args.window_blocks,
                        safety_blocks=safety, run_seed=args.run_seed, genesis=args.genesis, out_dir=out_dir,
                        status_file=status_file, drain_timeout_s=args.drain_timeout,
                        verify_sample=args.verify_sample, max_windows=args.max_windows, batch_size=batch_size,
                        warmup_problems=args.warmup_problems, pipeline_overrides=overrides)


def _hard_exit(code: int) -> NoReturn:
    """Leave now, abandoning worker threads (a GPU call cannot be interrupted); files are already safe."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class _StopDuringStartup(BaseException):
    """SIGTERM before the event loop took over the signals (model loading); a BaseException, like
    KeyboardInterrupt, so that no library's `except Exception` turns it into a load error."""


def _raise_stop(signum: int, frame: Any) -> None:
    raise _StopDuringStartup(signal.Signals(signum).name)


def _contains(exc: BaseException, kind: type[BaseException]) -> bool:
    if isinstance(exc, kind):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return any(_contains(e, kind) for e in exc.exceptions)
    return False


class Daemon:
    """One worker's mining loop: clock, source, pipeline and sink, plus signals, status and self-check."""

    def __init__(self, settings: MineSettings, runtime: Runtime, signer: Signer, engine: Engine,
                 batch_size: int, status: StatusFile) -> None:
        self.settings = settings
        self.runtime = runtime
        self.signer = signer
        self.engine = engine
        self.batch_size = batch_size
        self.status = status
        self.clock: WindowClock | None = None
        self.source: ProblemSource | None = None
        self.sink: WindowSink | None = None
        self.pipeline: Pipeline | None = None
        self.stopping = False
        self.stop_reason = "end of run"
        self.windows_written = 0
        self.totals = {"rollouts": 0, "groups": 0, "dropped_groups": 0}
        self._stage_mark: dict[str, float] = {}
        self._self_check: ObjectSendStream[tuple[int, list[dict]]] | None = None

    # -- assembling ---------------------------------------------------------------------------------
    def pipeline_config(self) -> PipelineConfig:
        return dataclasses.replace(self.runtime.pipeline_config(), **self.settings.pipeline_overrides)

    def new_pipeline(self) -> Pipeline:
        return Pipeline(self.engine, self.runtime.prover(), self.runtime.group_signer(self.signer),
                        self.pipeline_config())

    def make_task(self, window: WindowContext, index: int, block: int) -> ProblemTask:
        """The protocol's problem `index` of the window for our hotkey (the signer's ss58 address)."""
        return make_task(window, index, self.signer.ss58_address, self.runtime.tokenizer, self.runtime.lengths,
                         block=block)

    async def _status(self, **fields: Any) -> None:
        await anyio.to_thread.run_sync(lambda: self.status.update(**fields))

    # -- the run ------------------------------------------------------------------------------------
    async def main(self) -> int:
        async with anyio.create_task_group() as tg:
            await tg.start(self._watch_signals, tg)
            try:
                if self.settings.warmup_problems and not self.stopping:
                    await self._warm_up()
                if not self.stopping:
                    await self._mine(tg)
            except BaseException:
                if self.sink is not None:
                    with anyio.CancelScope(shield=True):
                        await self.sink.finish("the daemon failed")
                raise
            tg.cancel_scope.cancel()
        return 0

    async def _warm_up(self) -> None:
        n = self.settings.warmup_problems
        t0 = time.perf_counter()
        window = benchmark_window(self.settings.run_seed)
        indices = range(WARMUP_INDEX_OFFSET, WARMUP_INDEX_OFFSET + n)
        sink = BenchmarkSink(BatchResult(batch_size=self.batch_size), None, set(), 0)
        await self.new_pipeline().run(benchmark_tasks(self.runtime, window, indices, cap=WARMUP_MAX_TOKENS), sink)
        self.engine.reset_stats()
        logger.info("warm-up: %d problem(s) in %.1f s (not written)", n, time.perf_counter() - t0)

    async def _mine(self, tg: TaskGroup) -> None:
        s = self.settings
        self.clock = clock = WindowClock(s.block_time_s, s.window_blocks, s.safety_blocks, s.run_seed, s.genesis)
        self.sink = sink = WindowSink(
            s.out_dir, self.signer.ss58_address, s.worker, s.window_blocks, block_time_s=s.block_time_s,
            genesis=clock.genesis, on_written=self._window_written, sample_size=s.verify_sample,
            run_seed=s.run_seed,
            extra_metadata={"dry_run": "true", "run_seed": s.run_seed, "model": self.runtime.loaded.name,
                            "engine": self.runtime.engine_kind, "batch_size": self.batch_size},
        )
        self.source = source = ProblemSource(clock, s.worker, self.make_task, sink.close_window, s.max_windows)
        self.pipeline = pipeline = self.new_pipeline()
        self._stage_mark = pipeline.stage_seconds()
        await self._status(state="mining", genesis=clock.genesis, block_time_s=s.block_time_s,
                           window_blocks=s.window_blocks, safety_blocks=s.safety_blocks, run_seed=s.run_seed,
                           out_dir=str(s.out_dir))
        logger.info("mining (dry run: simulated chain, nothing uploaded) as %s; %s", s.worker.describe(),
                    clock.describe())
        tg.start_soon(self._heartbeat)
        async with anyio.create_task_group() as checks:
            if s.verify_sample:
                send, receive = anyio.create_memory_object_stream[tuple[int, list[dict]]](2)
                self._self_check = send
                checks.start_soon(self._self_check_worker, receive)
            try:
                await pipeline.run(source.tasks(), sink)
                await sink.finish("end of run")  # nothing is left after a clean drain
            finally:
                if self._self_check is not None:
                    self._self_check.close()
        logger.info("stopped (%s): %d window file(s), %d rollouts in %d groups (%d dropped)", self.stop_reason,
                    self.windows_written, self.totals["rollouts"], self.totals["groups"],
                    self.totals["dropped_groups"])

    # -- per window ---------------------------------------------------------------------------------
    async def _window_written(self, report: WindowReport, sample: list[dict]) -> None:
        self.windows_written += 1
        self.totals["rollouts"] += report.rollouts
        self.totals["groups"] += report.groups
        self.totals["dropped_groups"] += report.dropped_groups
        assert self.pipeline is not None
        stages = self.pipeline.stage_seconds()
        busy = {k: round(v - self._stage_mark.get(k, 0.0), 3) for k, v in stages.items()}
        self._stage_mark = stages
        depths = self.pipeline.queue_depths()
        logger.info(
            "window %d %s: %d rollouts (%d groups, %d dropped%s) %.2f rollouts/s, success %.1f %% (answer "
            "satisfies the formula; validator's flag with EOS: %.1f %%), mean reward %.3f | queues %s | "
            "busy s since last window %s | %s%s",
            report.window_start, self.settings.worker.describe(), report.rollouts, report.groups,
            report.dropped_groups, f", {len(report.missing_groups)} missing" if report.missing_groups else "",
            report.rollouts_per_s, report.success_pct, report.validator_success_pct, report.mean_reward,
            " ".join(f"{k}={v}" for k, v in depths.items()), " ".join(f"{k}={v:g}" for k, v in busy.items()),
            Path(report.file).name, " PARTIAL" if report.partial else "")
        last = report.as_dict()
        last.update(queue_depths=depths, stage_seconds=busy)
        await self._status(windows_written=self.windows_written, last_window=last, totals=dict(self.totals),
                           current_window=self.source.current_window if self.source else None)
        if sample and self._self_check is not None:
            try:
                self._self_check.send_nowait((report.window_start, list(sample)))
            except anyio.WouldBlock:
                logger.warning("window %d: self-check skipped (the previous ones are still running)",
                               report.window_start)
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                pass

    async def _self_check_worker(self, receive: ObjectReceiveStream[tuple[int, list[dict]]]) -> None:
        async with receive:
            async for window_start, records in receive:
                totals = await anyio.to_thread.run_sync(verify_sample, self.runtime, records)
                checked, passed = totals["rollouts_checked"], totals["rollouts_passed"]
                rate = 100.0 * passed / checked if checked else 0.0
                log = logger.info if passed == checked else logger.error
                log("window %d self-check (validator's method, every position): %d/%d rollouts pass (%.1f %%)",
                    window_start, passed, checked, rate)
                await self._status(self_check={"window_start": window_start, **totals, "pass_pct": round(rate, 2)})

    async def _heartbeat(self) -> None:
        interval = min(30.0, max(0.5, self.settings.window_seconds / 4))
        while True:
            await anyio.sleep(interval)
            fields: dict[str, Any] = {}
            if self.clock is not None:
                fields["block"] = self.clock.block()
            if self.source is not None:
                fields["current_window"] = self.source.current_window
            if self.pipeline is not None:
                fields["queue_depths"] = self.pipeline.queue_depths()
            if self.sink is not None:
                fields["open_windows"] = {str(k): {"arrived": a, "issued": i} for k, (a, i) in self.sink.pending().items()}
            await self._status(**fields)

    # -- stopping -----------------------------------------------------------------------------------
    async def _watch_signals(self, tg: TaskGroup, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            task_status.started()
            async for signum in signals:
                name = signal.Signals(signum).name
                if self.stopping:
                    logger.warning("second %s: exiting now, in-flight work is abandoned", name)
                    self.status.update(state="stopped", exit_reason=f"second {name}")
                    _hard_exit(128 + signum)
                self.stopping = True
                self.stop_reason = name
                logger.info("%s: stopping intake, finishing in-flight work (at most %g s; a second signal exits "
                            "at once)", name, self.settings.drain_timeout_s)
                if self.source is not None:
                    self.source.stop()
                await self._status(state="draining")
                tg.start_soon(self._drain_deadline)

    async def _drain_deadline(self) -> None:
        await anyio.sleep(self.settings.drain_timeout_s)
        logger.error("in-flight work did not finish within --drain-timeout %g s: writing what arrived and exiting",
                     self.settings.drain_timeout_s)
        with anyio.CancelScope(shield=True):
            if self.sink is not None:
                await self.sink.finish("drain timeout")
        self.status.update(state="stopped", exit_reason="drain timeout", windows_written=self.windows_written)
        _hard_exit(0)


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
        if _contains(exc, _StopDuringStartup) or _contains(exc, KeyboardInterrupt):
            logger.info("stopped before mining started")
            return 0
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _run(args: argparse.Namespace) -> int:
    _configure_logging(args.log_level)
    settings = resolve_settings(args, os.environ)
    signer = load_signer(required=True)
    try:
        settings.out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create --out-dir {settings.out_dir} ({exc.strerror or exc})") from None
    status = StatusFile(settings.status_file, settings.worker.worker_id, settings.worker.total_workers,
                        hotkey=signer.ss58_address, model=args.model, dry_run=True)
    try:
        status.update(state="starting")
    except OSError as exc:
        raise UserError(f"cannot write the status file {settings.status_file} ({exc.strerror or exc})") from None
    logger.info("starting %s, hotkey %s, window files in %s, status in %s", settings.worker.describe(),
                signer.ss58_address, settings.out_dir, settings.status_file)
    removed = remove_stale_temporaries(settings.out_dir, signer.ss58_address, settings.worker.worker_id)
    removed += remove_stale_status_temporaries(settings.status_file)
    if removed:
        logger.info("removed %d temporary file(s) a previous run of this worker left behind", len(removed))
    runtime: Runtime | None = None
    try:
        runtime = Runtime.from_args(args)
        batch_size = settings.batch_size or DEFAULT_BATCH_SIZES[runtime.engine_kind][0]
        runtime.check_batch_size(batch_size)
        logger.info("model %s on %s, %s engine, batch size %d, lengths %s", runtime.loaded.name,
                    runtime.loaded.device, runtime.engine_kind, batch_size, runtime.lengths.spec)
        engine = runtime.engine(batch_size)
        status.update(engine=runtime.engine_kind, batch_size=batch_size)
        daemon = Daemon(settings, runtime, signer, engine, batch_size, status)
        code = anyio.run(daemon.main)
        # the event loop's signal handlers are gone: keep the last status write from being cut short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        status.update(state="stopped", exit_reason=daemon.stop_reason, windows_written=daemon.windows_written,
                      open_windows={}, queue_depths={})
        return code
    except BaseException as exc:
        if _contains(exc, _StopDuringStartup) or _contains(exc, KeyboardInterrupt):
            status.update(state="stopped", exit_reason="signal during start-up")
            raise
        user = find_user_error(exc)
        status.update(state="stopped", exit_reason=f"error: {user or type(exc).__name__}")
        if user is not None:
            raise user from None
        raise
    finally:
        if runtime is not None:
            runtime.close()
