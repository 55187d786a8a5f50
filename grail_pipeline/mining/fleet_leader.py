"""The fleet's leader duties: one stop decision for all workers, and THE window file, written on time.

Whichever worker holds the leader lease (fleet/leader.py; every worker tries every third of its time to
live) runs `FleetLeader.tick`. Any worker can lead, so a dead leader is replaced within the lease's time to
live and the window is still written: the new leader sees a window past its cut, or sealed by a worker
that is gone without a file recorded, and writes it. Per window:

- **The stop and the cut.** The leader publishes `cut_at`, when the file starts being written, and
  `stop_at` = `cut_at` − the largest group latency any live worker reports in its heartbeat (a group
  admitted on the slowest GPU must still arrive before the cut) − one claim lease (room for one re-issue: a
  worker that dies holding an index claimed just before the stop lets its lease lapse within that time, and
  the index, re-issued at once, is still generated before the cut); after `stop_at` Redis hands out no fresh
  index of the window, only lapsed ones. `cut_at` is the leader's DeadlinePlan estimate (deadline − upload allowance − write time −
  margin) for the fleet's file: the expected rollouts that size the upload allowance and the write time
  come from the sum of the live workers' rates, so a 4-GPU fleet reserves ~4x a solo worker's. Every
  worker admits a claim only while its own measured latency brings the group in before `cut_at`
  (mining/deadline.py `fix_cut`). Once `stop_at` has passed neither is moved again and the leader cuts at
  the published `cut_at`: in the 4 x H200 run (bench/results/h200-x4-2026-11-27/fleet) the leader cut at
  its own estimate of the moment, which kept moving earlier as the summed rate rose after the stop (the
  cold start's and the idle gap's deliveries leaving the rate's horizon), and 23 % of the generated
  rollouts (1,104 of 4,880 in window 0) arrived after it; a solo worker cut none.
- **The file.** At the cut, or earlier once `stop_at` has passed and every issued index is stored
  (nothing in flight), the leader seals the window (Redis then refuses late groups and claims), reads the
  contiguous prefix 0..N−1 of stored groups and writes the file with the solo sink's writer
  (`sink.write_window`: same name, schema and metadata), then records the report (on-time and cut
  rollouts, margin, and each index missing from the prefix: in flight, or lost with its dead holder's
  lapsed lease, and the stored rollouts it cut) for `fleet-status`; nothing in the prefix: no file. With
  `--verify-sample` the writer hands its daemon a sample of the rows it wrote (`sink.file_sample`, the solo
  sink's), which that daemon's self-check verifies: each file is checked once, by the worker that wrote it, in
  that worker's status file and metrics. The write runs beside the worker's loop, which keeps renewing the
  leader lease and beating meanwhile: in that run the writes took 2–3 s, longer than the 1-s lease, and
  with the loop blocked the lease passed mid-write.
- **One writer per window.** The sealer writes the file. Another leader writes a window sealed by another
  worker, with no file recorded, only when (a) the sealer is gone: its heartbeat is older than `stale_s`
  (3 leader-lease times; it stops when the process dies or hangs, not while it writes) or it left the
  roster, or (b) the file is still missing at the plan's `last_call` (deadline − write time − margin), the
  latest moment a write can still land in time. A slower rule (the file missing one lease time after the
  cut) had three workers of that run write window 0 while its sealer, alive, was still writing it.
- **The last one out.** A draining worker that finds no other live worker writes the windows it mined in
  itself, at once (`write_now`): nobody else would.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio

from grail_pipeline.fleet.member import FleetMember
from grail_pipeline.fleet.retry import RedisUnavailable
from grail_pipeline.mining.chain import WindowClock
from grail_pipeline.mining.deadline import DeadlinePlan
from grail_pipeline.mining.group_payload import decode_group
from grail_pipeline.mining.hotkey_log import Log
from grail_pipeline.mining.sink import WindowContents, WindowReport, file_sample, gap_costs, write_window
from grail_pipeline.protocol.profile import PROFILE

logger = logging.getLogger("grail_pipeline")

OnWritten = Callable[[WindowReport, list[dict]], Awaitable[None]]


def live_workers(beats: dict[str, dict], stale_s: float) -> dict[str, dict]:
    """Workers whose last heartbeat is younger than `stale_s` (a killed worker's beat stays until it ages)."""
    return {w: b for w, b in beats.items() if b.get("age_s", stale_s) < stale_s}


def live_workers_age(member: FleetMember, worker: str | None) -> float:
    """How old `worker`'s last heartbeat is (inf once it left the roster), for the takeover's log line."""
    beat = member.heartbeats.read().get(worker or "")
    return float("inf") if beat is None else float(beat["age_s"])


class FleetLeader:
    """The leader's side of one worker: publish each window's stop, seal it and write its file."""

    def __init__(self, member: FleetMember, clock: WindowClock, plan: DeadlinePlan, hotkey: str, out_dir: Path,
                 checkpoint_window: Callable[[int], int], extra_metadata: dict, on_written: OnWritten,
                 log: Log = logger, sample_size: int = 0, run_seed: int = 0) -> None:
        self.log = log  # this hotkey's lines (mining/hotkey_log.py)
        self.member = member
        self.clock = clock
        self.plan = plan
        self.hotkey = hotkey
        self.out_dir = Path(out_dir)
        self.checkpoint_window = checkpoint_window
        self.extra_metadata = extra_metadata
        self.on_written = on_written  # each file this worker writes, with its self-check sample (`sample_size`)
        self.sample_size = sample_size
        self.run_seed = run_seed
        self.stale_s = 3 * member.timings.leader_ttl_s  # a worker silent this long is taken for dead
        self._stopped: set[int] = set()  # windows whose stop_at has passed: never republished
        self._done: set[int] = set()  # windows whose file is recorded as written
        self._writing: set[int] = set()  # windows whose file this worker is writing now

    # -- Redis reads, in a worker thread ----------------------------------------------------------------
    def live(self) -> dict[str, dict]:
        return live_workers(self.member.heartbeats.read(), self.stale_s)

    def others(self) -> dict[str, dict]:
        """The live workers besides this one."""
        return {w: b for w, b in self.live().items() if w != self.member.worker}

    def windows(self, now: float) -> list[int]:
        """The windows a leader looks after: the one open now and the one before (written late if need be)."""
        current = self.clock.window_start(self.clock.block(now))
        return [w for w in (current - self.clock.window_blocks, current) if w >= 0 and w not in self._done]

    # -- the leader's tick ------------------------------------------------------------------------------
    async def tick(self, spawn: Callable[..., object] | None = None) -> None:
        """One pass of the leader's duties; raises RedisUnavailable (via the guard) when Redis is away. A due
        file is written by `spawn(self.write_in_background, window, trigger)` when given (the worker's loop
        goes on renewing and beating meanwhile), else awaited here."""
        m = self.member
        now = time.time()
        live = await anyio.to_thread.run_sync(lambda: m.guard.attempt(self.live))
        rate = sum(float(b.get("rollouts_per_s") or 0.0) for b in live.values())
        self.plan.rate(rate)
        latency = max([self.plan.latency(now)] + [float(b.get("latency_s") or 0.0) for b in live.values()])
        for window_start in self.windows(now):
            if window_start in self._writing:
                continue
            await anyio.to_thread.run_sync(lambda w=window_start: m.guard.attempt(lambda: self._publish(w, now, latency)))
            trigger = await anyio.to_thread.run_sync(
                lambda w=window_start: m.guard.attempt(lambda: self._due(w, now, live)))
            if trigger is None:
                continue
            if spawn is None:
                await self.write(window_start, trigger)
            else:
                self._writing.add(window_start)
                spawn(self.write_in_background, window_start, trigger)

    async def write_in_background(self, window_start: int, trigger: str) -> None:
        """`write`, beside the worker's loop; Redis away for longer than the write's patience leaves the seal
        without a file, which the next tick (of this leader or another) writes."""
        self._writing.add(window_start)
        try:
            await self.write(window_start, trigger)
        except RedisUnavailable:
            pass  # said once by the guard
        finally:
            self._writing.discard(window_start)

    async def writes_done(self) -> None:
        """Wait for this worker's writes in progress (a leaving worker must not take its file with it)."""
        while self._writing:
            await anyio.sleep(0.05)

    def cut_time(self, window_start: int) -> float:
        """The window's cut: the published one (fixed once `stop_at` passed), else this plan's estimate."""
        published = self.member.plans.cut(window_start).cut_at
        return self.plan.estimated_cut(window_start) if published is None else published

    def _publish(self, window_start: int, now: float, latency: float) -> None:
        if window_start in self._stopped or window_start != self.clock.window_start(self.clock.block(now)):
            return
        published = self.member.plans.cut(window_start).stop_at
        if published is not None and now >= published:
            self._stopped.add(window_start)
            return
        cut_at = self.plan.estimated_cut(window_start)
        room = self.member.timings.claim_lease_s  # a dead worker's last claim lapses and is re-issued in time
        self.member.plans.publish(window_start, stop_at=cut_at - latency - room, cut_at=cut_at)

    def _due(self, window_start: int, now: float, live: dict[str, dict]) -> str | None:
        """"cut" or "complete" when the window's file is due now (this call sealed it, or a dead leader had);
        None when not yet, when nothing was mined in it, or when it is written."""
        m = self.member
        report = m.plans.report(window_start)
        if report is not None:
            if report.get("file_written"):
                self._done.add(window_start)
                return None
            sealer = report.get("sealed_by")
            if sealer == m.worker:
                return "cut"  # sealed here and not being written (the tick skips those): the write failed
            last_call = self.plan.last_call(window_start)
            if sealer in live and now < last_call:
                return None  # the sealer is alive: it is writing the file
            why = ("its heartbeat is %.1f s old" % live_workers_age(m, sealer) if sealer not in live
                   else "%.1f s before the deadline" % (self.plan.times(window_start).deadline - now))
            self.log.warning("window %d was sealed by %s and has no file (%s): writing it", window_start, sealer, why)
            return "cut"
        issued = m.claims.issued(window_start)
        if issued == 0:
            return None
        if now >= self.cut_time(window_start):
            trigger = "cut"
        else:
            stop_at = m.plans.cut(window_start).stop_at
            if stop_at is None or now < stop_at or m.claims.leases(window_start):
                return None
            counts = m.results.counts(window_start)
            if any(i not in counts for i in range(issued)):
                return None
            trigger = "complete"
        return trigger if m.plans.seal(window_start, m.worker) else None

    # -- writing ----------------------------------------------------------------------------------------
    async def write_now(self, reason: str) -> list[WindowReport]:
        """The last worker out: seal and write every looked-after window that has groups and no file yet."""
        m = self.member
        written = []
        await self.writes_done()
        for window_start in self.windows(time.time()):
            report = await anyio.to_thread.run_sync(lambda w=window_start: m.guard.attempt(lambda: m.plans.report(w)))
            if report is not None and report.get("file_written"):
                continue
            issued = await anyio.to_thread.run_sync(lambda w=window_start: m.guard.attempt(lambda: m.claims.issued(w)))
            if issued == 0:
                continue
            sealed = await anyio.to_thread.run_sync(
                lambda w=window_start: m.guard.attempt(lambda: m.plans.seal(w, m.worker)))
            others = await anyio.to_thread.run_sync(lambda: m.guard.attempt(self.others))
            if not sealed and (report or {}).get("sealed_by") in others:
                continue  # another live worker sealed it and is writing it
            written.append(await self.write(window_start, reason))
        return written

    async def write(self, window_start: int, trigger: str) -> WindowReport:
        """Read the window's prefix from Redis and write the file (the caller sealed the window: nothing lands
        in between unseen); record the report in Redis and hand it to the daemon."""
        m = self.member
        prefix, issued, counts, stop_at, leases = await anyio.to_thread.run_sync(lambda: m.guard.call(
            lambda: (m.results.prefix(window_start), m.claims.issued(window_start), m.results.counts(window_start),
                     m.plans.cut(window_start).stop_at, m.claims.leases(window_start)),
            patience_s=self.member.timings.leader_ttl_s))
        groups = await anyio.to_thread.run_sync(lambda: [decode_group(g.payload) for g in prefix.groups])
        missing = [i for i in range(issued) if i not in counts]
        in_flight = {lease.index: lease.owner for lease in leases if lease.remaining_s >= 0}
        lapsed = {lease.index: lease.owner for lease in leases if lease.remaining_s < 0}
        gaps = gap_costs(counts, {i: {"state": "in flight", "owner": in_flight[i]} if i in in_flight else
                                  {"state": "lost: its claim lapsed and no re-generation could arrive in time",
                                   "owner": lapsed.get(i)} for i in missing})
        window = dataclasses.replace(self.clock.context(window_start),
                                     checkpoint_window=self.checkpoint_window(window_start))
        contents = WindowContents(  # an index in flight is cut when it arrives; a lost one is never generated
            window=window, groups=groups, issued_groups=issued,
            cut_groups=prefix.cut_groups + len(in_flight.keys() & set(missing)),
            cut_rollouts=prefix.cut_rollouts + PROFILE.rollouts_per_problem * len(in_flight.keys() & set(missing)),
            failed_indices=[], missing_groups=missing, redraws=0,
            partial=trigger not in ("cut", "complete") and (stop_at is None or time.time() < stop_at),
            opened=self.clock.time_of_block(window_start), gaps=gaps)
        live = await anyio.to_thread.run_sync(lambda: m.guard.attempt(self.live))
        path = self.out_dir / PROFILE.window_file_name(self.hotkey, window_start)
        report = await write_window(path, self.hotkey, self.clock.window_blocks, contents, trigger, self.plan,
                                    {**self.extra_metadata, "fleet_writer": m.worker,
                                     "fleet_workers": max(1, len(live))})
        record = {"file": report.file, "groups": report.groups, "rollouts": report.rollouts,
                  "cut_groups": report.cut_groups, "cut_rollouts": report.cut_rollouts,
                  "margin_s": None if report.margin_s is None else round(report.margin_s, 3),
                  "on_time": report.on_time, "ready_at": round(report.ready_at, 3), "written": trigger,
                  "written_by": m.worker, "missing_groups": report.missing_groups, "gaps": report.gaps}
        await anyio.to_thread.run_sync(lambda: m.guard.call(lambda: m.plans.record_written(window_start, record),
                                                            patience_s=m.timings.leader_ttl_s))
        self._done.add(window_start)
        await self.on_written(report, await file_sample(contents, self.hotkey, self.sample_size, self.run_seed))
        return report
