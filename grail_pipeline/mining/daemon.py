"""One worker's mining loop: simulated chain clock, problem source, pipeline and window sink, with the
stop signals, the status file and the per-window self-check.

Behaves like a miner in every way except that it talks to no chain and uploads nothing: a WindowClock
stands in for the chain (blocks from elapsed time, per-window block hash and drand derived from the run
seed), a ProblemSource issues the window's problems 0, 1, 2, … while the deadline plan says they can still
make the file (mining/deadline.py), the same pipeline the benchmark measures generates, proves and signs
them, and a WindowSink writes the hotkey's one atomic Parquet file per window, before the deadline. Per
window it logs and records (status file `windows`) the on-time rollouts, the cut ones, the margin before
the deadline and the GPU's idle seconds. SIGINT/SIGTERM (what PM2 sends) stops intake, drains the
in-flight work into the current window's file (marked partial) and exits 0 within the drain timeout; a
second signal exits at once, and a signal during the warm-up exits at once (nothing of it is written).
A JSON status file tells a health check what the daemon is doing.

With GRAIL_REDIS_URL the worker is one of a fleet of its hotkey (mining/fleet_worker.py): its indices come from
the fleet's claims, its signed groups go to Redis, and whichever worker holds the leader lease writes the
window's one file (mining/fleet_leader.py), with the same writer and metadata as the solo sink, and hands this
daemon the same self-check sample (`sink.file_sample`): a fleet's file is checked once, by the worker that wrote it.

A Daemon is one hotkey's unit (clock, plan, source, sink, status); `mining/hotkeys.py` runs several of them from
one engine. With a target (`MineSettings.target_rollouts`, `fill`: mining/fill.py) a window takes no more than it.
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

from grail_pipeline.fleet.member import FleetMember
from grail_pipeline.inference.engine import Engine
from grail_pipeline.mining.chain import WindowClock, WindowContext
from grail_pipeline.mining.deadline import UPLOAD_MBIT_S, DeadlinePlan
from grail_pipeline.mining.fill import FillOrder
from grail_pipeline.mining.fleet_leader import FleetLeader
from grail_pipeline.mining.fleet_worker import FleetWorker
from grail_pipeline.mining.hotkey_log import hotkey_logger
from grail_pipeline.mining.messages import ProblemTask, make_task
from grail_pipeline.mining.pipeline import Pipeline, PipelineConfig
from grail_pipeline.mining.rotation import CheckpointRotation
from grail_pipeline.mining.runtime import Runtime
from grail_pipeline.mining.settings import MineSettings
from grail_pipeline.mining.sink import WindowReport, WindowSink
from grail_pipeline.mining.source import ProblemSource, local_indices
from grail_pipeline.mining.status import StatusFile
from grail_pipeline.mining.workload import benchmark_window, warm_up
from grail_pipeline.protocol.profile import PROFILE
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
                 batch_size: int, status: StatusFile, rotation: CheckpointRotation | None = None,
                 fleet: FleetMember | None = None) -> None:
        self.settings = settings
        self.log = hotkey_logger(signer.ss58_address, len(settings.wallets) > 1)  # this hotkey's lines
        self.rotation = rotation  # --checkpoint-dir: each window on its own checkpoint (mining/rotation.py)
        self.fleet = fleet  # GRAIL_REDIS_URL: claims, results and the file through Redis (mining/fleet_worker.py)
        self.runtime = runtime
        self.signer = signer
        self.engine = engine
        self.batch_size = batch_size
        self.status = status
        self.clock: WindowClock | None = None
        self.source: ProblemSource | None = None
        self.sink: WindowSink | FleetWorker | None = None
        self.pipeline: Pipeline | None = None
        self.stopping = False
        self.stop_reason = "end of run"
        self.windows_written = 0
        self.totals = {"rollouts": 0, "groups": 0, "cut_rollouts": 0, "late_groups": 0}
        self.plan: DeadlinePlan | None = None
        self.window_records: dict[str, dict] = dict(status.data.get("windows") or {})  # the files already on disk
        self._idle_mark = 0.0
        self.warming_up = False
        self._stage_mark: dict[str, float] = {}
        self._self_check: ObjectSendStream[tuple[Daemon, int, list[dict]]] | None = None
        self._checks_pending: list[int] = []  # windows whose sample is queued or being checked
        self.fill: FillOrder | None = None  # a target, or several hotkeys on this engine (mining/fill.py)

    # -- assembling ---------------------------------------------------------------------------------
    @property
    def units(self) -> list[Daemon]:
        """The hotkeys' units this daemon runs: itself (mining/hotkeys.py runs several)."""
        return [self]

    def pipeline_config(self) -> PipelineConfig:
        return dataclasses.replace(self.runtime.pipeline_config(), **self.settings.pipeline_overrides)

    def new_pipeline(self) -> Pipeline:
        return Pipeline(self.engine, self.runtime.prover(), self.runtime.group_signer(self.signer),
                        self.pipeline_config())

    def make_task(self, window: WindowContext, index: int, block: int, attempt: int) -> ProblemTask:
        """The protocol's problem `index` of the window for our hotkey (the signer's ss58 address)."""
        return make_task(window, index, self.signer.ss58_address, self.runtime.tokenizer, self.runtime.lengths,
                         block=block, attempt=attempt)

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
                with anyio.CancelScope(shield=True):
                    await self._finish_sinks("the daemon failed")
                raise
            tg.cancel_scope.cancel()
        return 0

    async def _warm_up(self) -> None:
        n = self.settings.warmup_problems
        t0 = time.perf_counter()
        self.warming_up = True
        logger.info("warming up: %d problem(s), not written (a stop signal now exits at once)", n)
        await warm_up(self.new_pipeline(), self.runtime, benchmark_window(self.settings.run_seed), n)
        self.warming_up = False
        self.engine.reset_stats()
        logger.info("warm-up: %d problem(s) in %.1f s (not written)", n, time.perf_counter() - t0)

    async def _mine(self, tg: TaskGroup) -> None:
        pipeline = self.new_pipeline()
        source, sink = await self._open(tg, pipeline)
        async with anyio.create_task_group() as checks:
            if self.settings.verify_sample:
                send, receive = anyio.create_memory_object_stream[tuple[Daemon, int, list[dict]]](2)
                self._self_check = send
                checks.start_soon(self._self_check_worker, receive)
            try:
                await pipeline.run(source.tasks(), sink)
                del pipeline  # a restart frees the old engine's memory before the new model loads
                while self.rotation is not None and self.rotation.pending is not None and not self.stopping:
                    # the source stopped before the window's first problem and the pipeline drained: nothing is lost
                    await (await self._restart_engine()).run(source.tasks(), sink)
                await sink.finish("end of run")  # nothing is left after a clean drain
            finally:
                if self._self_check is not None:
                    self._self_check.close()
        self._log_stopped()

    def _log_stopped(self) -> None:
        self.log.info("stopped (%s): %d window file(s), %d on-time rollouts in %d groups, %d cut (%d group(s) of "
                      "them after their window's file)", self.stop_reason, self.windows_written,
                      self.totals["rollouts"], self.totals["groups"], self.totals["cut_rollouts"],
                      self.totals["late_groups"])

    async def _open(self, tg: TaskGroup, pipeline: Pipeline) -> tuple[ProblemSource, WindowSink | FleetWorker]:
        """This hotkey's clock, plan, sink and source on `pipeline` (its own, or the one several hotkeys share),
        its status and heartbeat: everything but running the pipeline."""
        s = self.settings
        loaded = self.runtime.loaded
        genesis = s.genesis if self.fleet is None else self.fleet.context.genesis  # a fleet shares one clock
        self.clock = clock = WindowClock(s.block_time_s, s.window_blocks, s.safety_blocks, s.run_seed, genesis)
        cold_start = max(1, self.batch_size // PROFILE.rollouts_per_problem) if self.fleet is not None else None
        self.plan = plan = DeadlinePlan(clock.time_of_block, s.window_blocks, upload_allowance_s=s.upload_allowance_s,
                                        cold_start_groups=cold_start,  # a fleet worker's plan is queue-aware
                                        target_rollouts=s.target_rollouts)
        extra_metadata = {"dry_run": "true", "run_seed": s.run_seed, "genesis": clock.genesis,
                          "block_time": s.block_time_s, "model_name": loaded.name,
                          "checkpoint_window": loaded.checkpoint_window, "engine": self.runtime.engine_kind,
                          "batch_size": self.batch_size}
        self.sink = sink = self._fleet_worker(clock, plan, extra_metadata) if self.fleet is not None else WindowSink(
            s.out_dir, self.signer.ss58_address, s.worker, s.window_blocks, plan=plan,
            redraw=lambda task: self.source is not None and self.source.redraw(task),
            on_written=self._window_written, sample_size=s.verify_sample, run_seed=s.run_seed,
            extra_metadata=extra_metadata, on_late=self._late_group, log=self.log,
        )

        async def opened(window: WindowContext) -> None:  # the cut is timed from the open, whatever the source does
            tg.start_soon(self._cut_at, window.window_start)

        fleet = sink if isinstance(sink, FleetWorker) else None  # a fleet counts its windows (--max-windows)
        self.source = source = ProblemSource(clock, plan, self.make_task, sink.close_window,
                                             s.max_windows if fleet is None else None, on_open=opened,
                                             last_window=None if fleet is None else fleet.last_window,
                                             checkpoint_window=lambda start: self.runtime.loaded.checkpoint_window,
                                             before_window=self._before_window if self.rotation else None,
                                             indices=sink.indices if isinstance(sink, FleetWorker) else local_indices,
                                             target=None if self.fill is None else self.fill.target_groups,
                                             hold=None if self.fill is None else self._hold)
        if self.fill is not None:
            self.fill.join(self.signer.ss58_address, source)
        self.pipeline = pipeline
        self._stage_mark = pipeline.stage_seconds()
        self._idle_mark = pipeline.idle.seconds()
        await self._status(state="mining", genesis=clock.genesis, block_time_s=s.block_time_s,
                           window_blocks=s.window_blocks, safety_blocks=s.safety_blocks, run_seed=s.run_seed,
                           out_dir=str(s.out_dir), upload_allowance_s=s.upload_allowance_s,
                           checkpoint_window=loaded.checkpoint_window, model_name=loaded.name)
        del loaded  # with --checkpoint-dir the runtime may be replaced: nothing here keeps the old model alive
        logger.info("mining (dry run: simulated chain, nothing uploaded) as %s; %s; files due %s before each "
                    "window's deadline", s.worker.describe(), clock.describe(),
                    f"{s.upload_allowance_s:g} s" if s.upload_allowance_s is not None else
                    f"the upload time of the expected file at {UPLOAD_MBIT_S:g} Mbit/s")
        tg.start_soon(self._heartbeat)
        if isinstance(sink, FleetWorker):
            tg.start_soon(sink.run)
        return source, sink

    def _hold(self) -> bool:
        """The source's hold: another hotkey on this engine fills its target first (mining/fill.py)."""
        return self.fill is not None and self.fill.hold(self.signer.ss58_address)

    async def _before_window(self, window: WindowContext) -> WindowContext | None:
        """The rotation's switch to the window's checkpoint, as the window opens (ProblemSource's hook)."""
        assert self.rotation is not None and self.clock is not None and self.pipeline is not None
        return await self.rotation.before_window(window, self.clock.time_of_block(window.window_start),
                                                 self.runtime.loaded, self.pipeline.idle)

    async def _restart_engine(self) -> Pipeline:
        """A new runtime and engine for a checkpoint of another architecture, the old ones dropped first (one model
        on the GPU at a time); the pipeline drained before this, so no group is lost."""
        assert self.rotation is not None and self.source is not None
        window_start = self.source.clock.next_generation_window()
        old, self.pipeline = self.runtime, None
        await anyio.to_thread.run_sync(old.close)
        del old
        self.engine = None  # type: ignore[assignment] - replaced below, before anything reads it
        self.runtime, self.engine = await anyio.to_thread.run_sync(self.rotation.restart, window_start)
        self.pipeline = pipeline = self.new_pipeline()
        self._stage_mark = pipeline.stage_seconds()
        self._idle_mark = pipeline.idle.seconds()
        await self._status(engine=self.runtime.engine_kind, model_name=self.runtime.loaded.name,
                           checkpoint_window=self.runtime.loaded.checkpoint_window)
        return pipeline

    def _fleet_worker(self, clock: WindowClock, plan: DeadlinePlan, extra_metadata: dict) -> FleetWorker:
        """The fleet's side of this worker: claims for the source, Redis for the sink, the leader's duties."""
        assert self.fleet is not None
        s = self.settings
        leader = FleetLeader(self.fleet, clock, plan, self.signer.ss58_address, s.out_dir,
                             lambda start: self.runtime.loaded.checkpoint_window, extra_metadata, self._window_written,
                             log=self.log, sample_size=s.verify_sample, run_seed=s.run_seed)
        return FleetWorker(self.fleet, clock, plan, leader,
                           redraw=lambda task: self.source is not None and self.source.redraw(task),
                           stopping=lambda: self.stopping, status=self.status, worker_id=s.worker.worker_id,
                           max_windows=s.max_windows, log=self.log)

    async def _cut_at(self, window_start: int) -> None:
        """At the plan's cut, write what has arrived (the file is usually written before, when complete)."""
        assert self.plan is not None and self.sink is not None and self.clock is not None
        while (wait := self.plan.cut(window_start) - self.clock.time_fn()) > 0:
            if self.sink.written(window_start):
                return
            await anyio.sleep(min(wait, 0.5))
        await self.sink.cut(window_start)

    # -- per window ---------------------------------------------------------------------------------
    async def _window_written(self, report: WindowReport, sample: list[dict]) -> None:
        self.windows_written += 1 if report.file is not None else 0
        self.totals["rollouts"] += report.rollouts
        self.totals["groups"] += report.groups
        self.totals["cut_rollouts"] += report.cut_rollouts
        assert self.pipeline is not None
        stages = self.pipeline.stage_seconds()
        busy = {k: round(v - self._stage_mark.get(k, 0.0), 3) for k, v in stages.items()}
        self._stage_mark = stages
        idle = self.pipeline.idle.seconds()
        idle_s, self._idle_mark = idle - self._idle_mark, idle
        depths = self.pipeline.queue_depths()
        margin = report.margin_s
        for gap in report.gaps:
            self.log.warning("window %d: index %d %s%s: the file ends before it, %d stored rollouts after it cut",
                             report.window_start, gap["index"], gap["state"],
                             f" (held by {gap['owner']})" if gap.get("owner") else "", gap["rollouts_cut_after"])
        log = self.log.info if report.on_time else self.log.error
        if report.file is None:
            log = self.log.warning
        on_gpu = self.runtime.loaded.device.type == "cuda"  # no GPU to be idle on the CPU
        log("window %d: %d on-time rollouts (%d groups%s), %d cut, file ready %s the deadline%s | "
            "%ssuccess %.1f %% (answer satisfies the formula; validator's flag "
            "with EOS: %.1f %%), mean reward %.3f | write %.2f s, %.1f KB/rollout | busy s %s | %s%s",
            report.window_start, report.rollouts, report.groups,
            f", {report.redraws} redrawn" if report.redraws else "", report.cut_rollouts,
            "?" if margin is None else f"{abs(margin):.1f} s {'before' if margin >= 0 else 'AFTER'}",
            f" (failed indices {report.failed_indices}: the file ends at the first)" if report.failed_indices else "",
            f"GPU idle {idle_s:.1f} s since the last file | " if on_gpu else "", report.success_pct, report.validator_success_pct, report.mean_reward, report.write_seconds,
            report.file_bytes / max(1, report.rollouts) / 1e3, " ".join(f"{k}={v:g}" for k, v in busy.items()),
            Path(report.file).name if report.file else "NO FILE (no rollout in it)", " PARTIAL" if report.partial else "")
        record = report.as_dict()
        record.update(idle_gpu_s=round(idle_s, 3), queue_depths=depths, stage_seconds=busy)
        if self.plan is not None:
            record["plan"] = self.plan.describe(report.window_start)
        self.window_records[str(report.window_start)] = record
        await self._status(windows_written=self.windows_written, totals=dict(self.totals), windows=self.window_records,
                           current_window=self.source.current_window if self.source else None,
                           **({"last_window": record} if report.file is not None else {}))
        if self.fill is not None and self.plan is not None:
            spare = self.fill.written(self.signer.ss58_address, report, self.plan.times(report.window_start),
                                      self.plan.cut(report.window_start))
            if spare is not None:
                (logger.warning if spare.short else logger.info)("%s", spare.describe())
                await self._status(spare_capacity=spare.as_dict())
        if sample and self._self_check is not None:
            if self.stopping:  # see _self_check_worker: after a stop signal no check starts
                await anyio.to_thread.run_sync(self._self_check_not_run, report.window_start,
                                               f"stopping ({self.stop_reason})")
                return
            self._checks_pending.append(report.window_start)
            try:
                self._self_check.send_nowait((self, report.window_start, list(sample)))
            except anyio.WouldBlock:
                await anyio.to_thread.run_sync(self._self_check_not_run, report.window_start,
                                               "the previous ones are still running")
            except anyio.ClosedResourceError:  # a file written after mining ended: the daemon failed
                await anyio.to_thread.run_sync(self._self_check_not_run, report.window_start, "mining ended")
            except anyio.BrokenResourceError:  # the check stopped for good, and said so once
                self._checks_pending.remove(report.window_start)

    async def _late_group(self, window_start: int, index: int, rollouts: int) -> None:
        """A group that arrived after its window's file and was not counted there: cut, in the window's record
        (made here when the window has none: its cut found nothing), the totals and the stopped line."""
        self.totals["cut_rollouts"] += rollouts
        self.totals["late_groups"] += 1
        record = self.window_records.setdefault(str(window_start), {
            "window_start": window_start, "file": None, "rollouts": 0, "groups": 0, "cut_groups": 0,
            "cut_rollouts": 0})
        record["cut_groups"] += 1
        record["cut_rollouts"] += rollouts
        record["late_groups"] = record.get("late_groups", 0) + 1
        await self._status(windows=self.window_records, totals=dict(self.totals))

    def _self_check_not_run(self, window_start: int, reason: str) -> None:
        """A written window whose sample will not be checked: said in the log and in the status file's self_check
        (`not_run`), never dropped without a word; `verify` checks the file itself."""
        if window_start in self._checks_pending:
            self._checks_pending.remove(window_start)
        self.log.warning("window %d self-check not run: %s (`verify` checks the file)", window_start, reason)
        self.status.update(self_check={"window_start": window_start, "not_run": reason})

    async def _self_check_worker(self, receive: ObjectReceiveStream[tuple[Daemon, int, list[dict]]]) -> None:
        """Each window's sample through the validator's method, in a process of its own that loads the checkpoint
        as a validator does (started at the first sample, kept until mining ends); several hotkeys on one engine
        share it (each sample's unit gets its result).

        At the end of the run (--max-windows) every queued sample is checked before the daemon exits, the last
        window's too (its file may be written by the cut as mining ends: WindowSink.finish waits for that report,
        and `_mine` closes this queue only after it): the run was asked for those checks and nothing hurries it.
        After a stop signal a check already running finishes (it cannot be interrupted; with its model loaded it
        takes seconds), but none starts: PM2 stops or restarts a process expecting it gone within --drain-timeout,
        and a check may first load a model (a new process per checkpoint), so the drain would wait on a
        diagnostic of files already safe on disk. Those samples are recorded as not run (`_self_check_not_run`),
        as is every pending one when the daemon exits at once (a second signal, the drain timeout)."""
        check: ValidatorProcess | None = None
        try:
            async with receive:
                async for unit, window_start, records in receive:
                    if self.stopping:
                        await anyio.to_thread.run_sync(unit._self_check_not_run, window_start,
                                                       f"stopping ({self.stop_reason})")
                        continue
                    source = ((self.rotation.source_of(window_start) if self.rotation else None)
                              or self.runtime.loaded.source)
                    if check is not None and check.source != source:  # the window was mined on another checkpoint
                        await anyio.to_thread.run_sync(check.close)
                        check = None
                    if check is None:
                        check = ValidatorProcess(source, str(self.runtime.loaded.device))
                    try:
                        totals = await anyio.to_thread.run_sync(check.verify, records)
                    except CheckUnavailable as exc:  # mining goes on; the self-check stops, said once
                        unit.log.error("window %d self-check not run, none from now on: %s", window_start, exc)
                        for each in self.units:  # the queued ones too: this line said it
                            each._checks_pending.clear()
                        await unit._status(self_check={"window_start": window_start, "error": str(exc)})
                        return
                    checked, passed = totals["rollouts_checked"], totals["rollouts_passed"]
                    rate = 100.0 * passed / checked if checked else 0.0
                    log = unit.log.info if passed == checked else unit.log.error
                    log("window %d self-check (validator's method, every position, model loaded from %s): "
                        "%d/%d rollouts pass (%.1f %%)", window_start, check.source, passed, checked, rate)
                    unit._checks_pending.remove(window_start)
                    await unit._status(self_check={"window_start": window_start, **totals,
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
                fields["open_windows"] = {str(k): {"resolved": a, "issued": i} for k, (a, i) in self.sink.pending().items()}
            if self.fill is not None and self.fill.last is not None:  # every hotkey's status shows the engine's
                fields["spare_capacity"] = self.fill.last.as_dict()
            await self._status(**fields)

    # -- stopping -----------------------------------------------------------------------------------
    async def _watch_signals(self, tg: TaskGroup, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            task_status.started()
            async for signum in signals:
                name = signal.Signals(signum).name
                if self.stopping:
                    logger.warning("second %s: exiting now, in-flight work is abandoned", name)
                    self._abandon_self_checks(f"second {name}")
                    self._update_statuses(state="stopped", exit_reason=f"second {name}")
                    hard_exit(128 + signum)
                if self.warming_up:  # nothing of the warm-up is written: no reason to wait for it
                    logger.info("%s during the warm-up: nothing to write, exiting", name)
                    self._update_statuses(state="stopped", exit_reason=f"{name} during warm-up")
                    hard_exit(0)
                logger.info("%s: stopping intake, finishing in-flight work (at most %g s; a second signal exits "
                            "at once)", name, self.settings.drain_timeout_s)
                self._stop_intake(name)
                await anyio.to_thread.run_sync(lambda: self._update_statuses(state="draining"))
                tg.start_soon(self._drain_deadline)

    def _stop_intake(self, reason: str) -> None:
        """No new problem from now on; what is in flight drains into the open window's file."""
        self.stopping = True
        self.stop_reason = reason
        if self.source is not None:
            self.source.stop()

    def _abandon_self_checks(self, reason: str) -> None:
        """Before an immediate exit: every hotkey's queued or running self-check recorded as not run."""
        for unit in self.units:
            for window_start in list(unit._checks_pending):
                unit._self_check_not_run(window_start, f"exiting at once ({reason})")

    def _update_statuses(self, **fields: Any) -> None:
        """Every status file this daemon writes (one per hotkey: mining/hotkeys.py has several)."""
        self.status.update(windows_written=self.windows_written, **fields)

    async def _finish_sinks(self, reason: str) -> None:
        """Write every open window as partial (a failure, a drain timeout)."""
        if self.sink is not None:
            await self.sink.finish(reason)

    async def _drain_deadline(self) -> None:
        await anyio.sleep(self.settings.drain_timeout_s)
        logger.error("in-flight work did not finish within --drain-timeout %g s: writing what arrived and exiting",
                     self.settings.drain_timeout_s)
        with anyio.CancelScope(shield=True):
            await self._finish_sinks("drain timeout")
        self._abandon_self_checks("drain timeout")
        self._update_statuses(state="stopped", exit_reason="drain timeout")
        hard_exit(0)
