"""The fleet's leader duties: one stop decision for all workers, and THE window file, written on time.

Whichever worker holds the leader lease (fleet/leader.py; every worker tries every third of its time to
live) runs `FleetLeader.tick`. Any worker can lead, so a dead leader is replaced within the lease's time to
live and the window is still written: the new leader sees a window past its cut, or sealed by a worker
that is gone without a file recorded, and writes it. Per window:

- **The stop.** The leader publishes `stop_at`, after which Redis hands out no index of the window, so no
  worker burns GPU time on groups that cannot make the file. It comes from the leader's own DeadlinePlan
  (the deadline, the measured write time and upload allowance, the margin) with two fleet-wide
  measurements: the group latency is the largest any live worker reports in its heartbeat (a group
  admitted on the slowest GPU must still arrive before the cut), and the expected rollouts, which size the
  upload allowance and the write time, come from the sum of the live workers' rates. Once `stop_at` has
  passed it is never moved again.
- **The file.** At the plan's cut, or earlier once `stop_at` has passed and every issued index is stored
  (nothing in flight), the leader seals the window (Redis then refuses late groups and claims), reads the
  contiguous prefix 0..N−1 of stored groups and writes the file with the solo sink's writer
  (`sink.write_window`: same name, schema and metadata), then records the report (on-time and cut
  rollouts, margin) for `fleet-status`.
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
from grail_pipeline.mining.chain import WindowClock
from grail_pipeline.mining.deadline import DeadlinePlan
from grail_pipeline.mining.group_payload import decode_group
from grail_pipeline.mining.sink import WindowContents, WindowReport, write_window
from grail_pipeline.protocol.profile import PROFILE

logger = logging.getLogger("grail_pipeline")

OnWritten = Callable[[WindowReport, list[dict]], Awaitable[None]]


def live_workers(beats: dict[str, dict], stale_s: float) -> dict[str, dict]:
    """Workers whose last heartbeat is younger than `stale_s` (a killed worker's beat stays until it ages)."""
    return {w: b for w, b in beats.items() if b.get("age_s", stale_s) < stale_s}


class FleetLeader:
    """The leader's side of one worker: publish each window's stop, seal it and write its file."""

    def __init__(self, member: FleetMember, clock: WindowClock, plan: DeadlinePlan, hotkey: str, out_dir: Path,
                 checkpoint_window: Callable[[int], int], extra_metadata: dict, on_written: OnWritten) -> None:
        self.member = member
        self.clock = clock
        self.plan = plan
        self.hotkey = hotkey
        self.out_dir = Path(out_dir)
        self.checkpoint_window = checkpoint_window
        self.extra_metadata = extra_metadata
        self.on_written = on_written
        self.stale_s = 3 * member.timings.leader_ttl_s  # a worker silent this long is taken for dead
        self._stopped: set[int] = set()  # windows whose stop_at has passed: never republished
        self._done: set[int] = set()  # windows whose file is recorded as written

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
    async def tick(self) -> None:
        """One pass of the leader's duties; raises RedisUnavailable (via the guard) when Redis is away."""
        m = self.member
        now = time.time()
        live = await anyio.to_thread.run_sync(lambda: m.guard.attempt(self.live))
        rate = sum(float(b.get("rollouts_per_s") or 0.0) for b in live.values())
        self.plan.rate(rate)
        latency = max([self.plan.latency(now)] + [float(b.get("latency_s") or 0.0) for b in live.values()])
        for window_start in self.windows(now):
            await anyio.to_thread.run_sync(lambda w=window_start: m.guard.attempt(lambda: self._publish(w, now, latency)))
            trigger = await anyio.to_thread.run_sync(
                lambda w=window_start: m.guard.attempt(lambda: self._due(w, now, live)))
            if trigger is not None:
                await self.write(window_start, trigger)

    def _publish(self, window_start: int, now: float, latency: float) -> None:
        if window_start in self._stopped or window_start != self.clock.window_start(self.clock.block(now)):
            return
        published = self.member.plans.cut(window_start).stop_at
        if published is not None and now >= published:
            self._stopped.add(window_start)
            return
        self.member.plans.publish(window_start, stop_at=self.plan.cut(window_start) - latency)

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
            if sealer == m.worker or sealer not in live or now >= self.plan.cut(window_start) + m.timings.leader_ttl_s:
                logger.warning("window %d was sealed by %s, whose file is missing: writing it", window_start, sealer)
                return "cut"
            return None
        issued = m.claims.issued(window_start)
        if issued == 0:
            return None
        if now >= self.plan.cut(window_start):
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
        prefix, issued, counts, stop_at = await anyio.to_thread.run_sync(lambda: m.guard.call(
            lambda: (m.results.prefix(window_start), m.claims.issued(window_start), m.results.counts(window_start),
                     m.plans.cut(window_start).stop_at), patience_s=self.member.timings.leader_ttl_s))
        groups = await anyio.to_thread.run_sync(lambda: [decode_group(g.payload) for g in prefix.groups])
        missing = [i for i in range(issued) if i not in counts]
        window = dataclasses.replace(self.clock.context(window_start),
                                     checkpoint_window=self.checkpoint_window(window_start))
        contents = WindowContents(
            window=window, groups=groups, issued_groups=issued, cut_groups=prefix.cut_groups + len(missing),
            cut_rollouts=prefix.cut_rollouts + PROFILE.rollouts_per_problem * len(missing), failed_indices=[],
            missing_groups=missing, redraws=0,
            partial=trigger not in ("cut", "complete") and (stop_at is None or time.time() < stop_at),
            opened=self.clock.time_of_block(window_start))
        live = await anyio.to_thread.run_sync(lambda: m.guard.attempt(self.live))
        path = self.out_dir / PROFILE.window_file_name(self.hotkey, window_start)
        report = await write_window(path, self.hotkey, self.clock.window_blocks, contents, trigger, self.plan,
                                    {**self.extra_metadata, "fleet_writer": m.worker,
                                     "fleet_workers": max(1, len(live))})
        record = {"file": report.file, "groups": report.groups, "rollouts": report.rollouts,
                  "cut_groups": report.cut_groups, "cut_rollouts": report.cut_rollouts,
                  "margin_s": None if report.margin_s is None else round(report.margin_s, 3),
                  "on_time": report.on_time, "ready_at": round(report.ready_at, 3), "written": trigger,
                  "written_by": m.worker}
        await anyio.to_thread.run_sync(lambda: m.guard.call(lambda: m.plans.record_written(window_start, record),
                                                            patience_s=m.timings.leader_ttl_s))
        self._done.add(window_start)
        await self.on_written(report, [])
        return report
