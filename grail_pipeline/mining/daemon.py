"""One worker's mining loop: simulated chain clock, problem source, pipeline and window sink, with the
stop signals, the status file and the per-window self-check.

Behaves like a miner in every way except that it talks to no chain and uploads nothing: a WindowClock
stands in for the chain (blocks from elapsed time, per-window block hash and drand derived from the run
seed), a ProblemSource issues this worker's problems of each window while it is open, the same pipeline
the benchmark measures generates, proves and signs them, and a WindowSink writes one atomic Parquet file
per window and worker. SIGINT/SIGTERM (what PM2 sends) stops intake, drains the in-flight work into the
current window's file (marked partial) and exits 0 within the drain timeout; a second signal exits at
once. A JSON status file tells a health check what the daemon is doing.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import anyio
from anyio.abc import ObjectReceiveStream, ObjectSendStream, TaskGroup, TaskStatus

from grail_pipeline.inference.engine import Engine
from grail_pipeline.mining.chain import WindowClock, WindowContext
from grail_pipeline.mining.messages import ProblemTask, make_task
from grail_pipeline.mining.pipeline import Pipeline, PipelineConfig
from grail_pipeline.mining.runtime import Runtime
from grail_pipeline.mining.settings import MineSettings
from grail_pipeline.mining.sink import WindowReport, WindowSink
from grail_pipeline.mining.source import ProblemSource
from grail_pipeline.mining.status import StatusFile
from grail_pipeline.mining.workload import benchmark_window, warm_up
from grail_pipeline.protocol.wallet import Signer
from grail_pipeline.proving.validator_process import CheckUnavailable, ValidatorProcess

logger = logging.getLogger("grail_pipeline")


def hard_exit(code: int) -> NoReturn:
    """Leave now, abandoning worker threads (a GPU call cannot be interrupted); files are already safe."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


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
        await warm_up(self.new_pipeline(), self.runtime, benchmark_window(self.settings.run_seed), n)
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
        """Each window's sample through the validator's method, in a process of its own that loads the checkpoint
        as a validator does (started at the first sample, kept until mining ends)."""
        check: ValidatorProcess | None = None
        try:
            async with receive:
                async for window_start, records in receive:
                    if check is None:
                        loaded = self.runtime.loaded
                        check = ValidatorProcess(loaded.source, str(loaded.device))
                    try:
                        totals = await anyio.to_thread.run_sync(check.verify, records)
                    except CheckUnavailable as exc:  # mining goes on; the self-check stops, said once
                        logger.error("window %d self-check not run, none from now on: %s", window_start, exc)
                        await self._status(self_check={"window_start": window_start, "error": str(exc)})
                        return
                    checked, passed = totals["rollouts_checked"], totals["rollouts_passed"]
                    rate = 100.0 * passed / checked if checked else 0.0
                    log = logger.info if passed == checked else logger.error
                    log("window %d self-check (validator's method, every position, model loaded from %s): "
                        "%d/%d rollouts pass (%.1f %%)", window_start, check.source, passed, checked, rate)
                    await self._status(self_check={"window_start": window_start, **totals,
                                                   "pass_pct": round(rate, 2)})
        finally:
            if check is not None:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(check.close)

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
                    hard_exit(128 + signum)
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
        hard_exit(0)
