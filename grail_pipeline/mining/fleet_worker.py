"""One worker of a fleet (`GRAIL_REDIS_URL` set): its problem indices from the fleet's claims, its signed
groups to Redis, and the loop that keeps its leases, its heartbeat and, while it leads, the leader's duties.

The daemon is the solo one with three parts swapped (mining/daemon.py):
- **Indices.** `FleetWorker.indices` is the ProblemSource's index provider: each index is a claim
  (fleet/claims.py), lapsed ones first, so a dead worker's indices go to the next worker that asks. After
  the leader's `stop_at` Redis hands out no fresh index, but a lapsed one still, so the provider goes on
  asking every `REISSUE_POLL_S` while other workers hold leases in the window and this worker's plan says a
  group admitted now still makes the file; it ends when neither holds, or the file is written. While Redis
  is away it waits (there is nothing to mine without an index) and checks every `CLAIM_RETRY_S` whether the
  window closed or the daemon is stopping. A dropped group is redrawn by the worker holding the index
  (the source's redraw queue), and released for another worker when it cannot be.
- **The sink.** `FleetWorker.put` (the pipeline's GroupSink) converts the signed group's records to the
  window file's Arrow rows once and hands them to Redis as one IPC payload the moment it is signed
  (mining/group_payload.py, fleet/handover.py): while Redis is away the group goes to the local spill
  (`<out-dir>/spill/<hotkey>`) and is merged back by the next heartbeat that reaches Redis. A claim lost while the
  group was in the pipeline (its lease lapsed and another worker took it) costs nothing: the first group
  stored wins, the other is a duplicate.
- **The loop.** `FleetWorker.run`, every third of the leader lease's time to live: renew this worker's
  leases, beat (rate, latency, claims, spill, Redis outage: what `fleet-status` shows and the leader plans
  with), keep the shared context alive, merge the spill, try the leader lease and, when held, run
  `FleetLeader.tick`.

Stopping (`finish`): the worker waits for its leader's tick under way and the file writes it began (each reports
its window to the daemon before `finish` returns, as the solo sink's finish does), hands back claims it will not
finish, leaves the roster, and if it is the last live worker it writes the unwritten windows itself; otherwise the
leader (or the next one) does.

`--max-windows N` counts the fleet's windows, not each worker's: the first window any worker of the run
opens is kept in Redis (`WindowPlans.first_window`), every worker mines that window and the N−1 after it
(`last_window`), and at the end of the run it stays (beating, renewing, leading if it holds the lease)
until the fleet's last window has its file. Counted per worker, in the 4 x H200 run
(bench/results/h200-x4-2026-11-27/fleet) three workers left at the stop of window 30 and one wrote it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
from collections import defaultdict, deque
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Any

import anyio

from grail_pipeline.fleet.connection import connect, redacted
from grail_pipeline.fleet.context import FleetContext, SharedContext
from grail_pipeline.fleet.keys import FleetKeys
from grail_pipeline.fleet.member import FleetMember, FleetTimings
from grail_pipeline.fleet.results import SignedGroup as StoredGroup
from grail_pipeline.fleet.retry import RedisUnavailable
from grail_pipeline.fleet.spill import SUFFIX as SPILL_SUFFIX
from grail_pipeline.inference.loading import CheckpointSource
from grail_pipeline.mining.chain import WindowClock
from grail_pipeline.mining.deadline import DeadlinePlan
from grail_pipeline.mining.fleet_leader import FleetLeader
from grail_pipeline.mining.group_payload import encode_group
from grail_pipeline.mining.hotkey_log import Log
from grail_pipeline.mining.messages import SignedGroup
from grail_pipeline.mining.settings import MineSettings
from grail_pipeline.mining.sink import MAX_DRAWS, GroupRows, Redraw, WindowReport
from grail_pipeline.mining.source import WindowClose
from grail_pipeline.mining.status import StatusFile
from grail_pipeline.protocol.records import records_table

logger = logging.getLogger("grail_pipeline")

CLAIM_RETRY_S = 0.5  # while Redis is away: how often a waiting claim looks at the window and the stop
REISSUE_POLL_S = 0.25  # after the stop: how often a worker looks for a dead worker's lapsed claims
LEAVE_PATIENCE_S = 5.0  # a stopping worker's tries to hand its spill and claims over before it leaves
SPILL_DIR = "spill"  # under --out-dir, a folder per hotkey: shared by the workers of one machine, merged by any


def spill_dir(out_dir: Path, hotkey: str) -> Path:
    """`<out-dir>/spill/<hotkey>`: one directory per hotkey, because a spilled group names its window and index but
    not its hotkey, and whichever worker merges the directory stores every group in its own hotkey's fleet (one
    flat directory would have put a group of one hotkey into another's window when several hotkeys, or several
    hotkeys' fleets, share an out dir)."""
    return out_dir / SPILL_DIR / hotkey


def checkpoint_identity(name: str, checkpoint_window: int, source: str) -> str:
    """What a fleet compares at join: the model's name, its checkpoint window and a hash of the checkpoint
    directory's config.json (of the name where there is no directory, e.g. a hub id)."""
    config = Path(source) / "config.json"
    data = config.read_bytes() if config.is_file() else source.encode()
    return f"{name}@{checkpoint_window}#{hashlib.sha256(data).hexdigest()[:12]}"


def proposal(settings: MineSettings, checkpoint: CheckpointSource) -> FleetContext:
    """This worker's clock and checkpoint, as the fleet compares them."""
    return FleetContext(genesis=settings.genesis, run_seed=settings.run_seed, block_time_s=settings.block_time_s,
                        window_blocks=settings.window_blocks,
                        checkpoint=checkpoint_identity(checkpoint.name, checkpoint.checkpoint_window, checkpoint.source))


def check_fleet(settings: MineSettings, hotkey: str, checkpoint: CheckpointSource) -> None:
    """Before anything slow: one UserError line when Redis is unreachable or the fleet mines another checkpoint
    (or clock). A worker of another model was refused only after it had loaded it (22 s on the CPU)."""
    assert settings.redis_url is not None
    client = connect(settings.redis_url)
    try:
        SharedContext(client, FleetKeys(hotkey)).check(proposal(settings, checkpoint))
    finally:
        client.close()


def join_fleet(settings: MineSettings, hotkey: str, checkpoint: CheckpointSource,
               worker: str | None = None) -> FleetMember:
    """Join the hotkey's fleet at `settings.redis_url` with this worker's clock and checkpoint (as `worker`: a
    process serving several hotkeys is one worker of each hotkey's fleet): one UserError line when Redis is
    unreachable or the fleet mines another checkpoint (or clock)."""
    assert settings.redis_url is not None
    member = FleetMember.join(settings.redis_url, hotkey, proposal(settings, checkpoint), spill_dir(settings.out_dir, hotkey),
                              timings_for(settings.window_seconds), worker)
    legacy = sorted((settings.out_dir / SPILL_DIR).glob(f"*{SPILL_SUFFIX}"))
    if legacy:  # spilled before the folders per hotkey: which hotkey's they are is not recorded, so none merges them
        logger.warning("%d signed group(s) in %s were spilled before spills had a folder per hotkey and are not "
                       "merged: move them into %s if they are this hotkey's (only if no other hotkey shares this "
                       "out dir)", len(legacy), settings.out_dir / SPILL_DIR, spill_dir(settings.out_dir, hotkey))
    t = member.timings
    logger.info("joined the fleet of %s at %s as %s (checkpoint %s, genesis %.3f; claims lapse %g s after their "
                "last renewal, a dead leader is replaced within %g s)", hotkey, redacted(settings.redis_url),
                member.worker, member.context.checkpoint, member.context.genesis, t.claim_lease_s, t.leader_ttl_s)
    return member


def timings_for(window_seconds: float) -> FleetTimings:
    """Lease times scaled to the window: a 6-minute window gets the defaults (claims lapse 10 s after their
    last renewal, a dead leader is replaced within 5 s); a short rehearsal window (12 s in the CPU tests)
    gets shorter ones, with floors that survive a busy host (renewals come every third of a lease)."""
    scale = window_seconds / 360.0
    return FleetTimings(claim_lease_s=max(2.0, 10.0 * scale), leader_ttl_s=max(1.0, 5.0 * scale),
                        window_ttl_s=max(60.0, 3 * window_seconds), context_ttl_s=max(10.0, window_seconds / 3),
                        warn_after_s=min(3.0, max(1.0, window_seconds / 12)))


class FleetWorker:
    """Claims, delivery, heartbeat and leadership of one worker; its `put`/`close_window`/`cut`/`pending`/
    `finish` are the daemon's sink interface."""

    def __init__(self, member: FleetMember, clock: WindowClock, plan: DeadlinePlan, leader: FleetLeader,
                 redraw: Redraw, stopping: Callable[[], bool], status: StatusFile, worker_id: int,
                 max_windows: int | None = None, log: Log = logger) -> None:
        self.log = log  # this hotkey's lines (mining/hotkey_log.py)
        self.member = member
        self.clock = clock
        self.plan = plan
        self.leader = leader
        self.redraw = redraw
        self.stopping = stopping
        self.status = status
        self.worker_id = worker_id
        self.max_windows = max_windows  # the fleet's windows of this run (None: until stopped)
        self._first_window: int | None = None
        self.held: dict[int, set[int]] = defaultdict(set)  # window start -> indices claimed, not yet stored
        self.outcomes: dict[str, int] = defaultdict(int)  # stored / duplicate / late / spilled / released
        self.claims_lost = 0
        self.claims_reissued = 0  # taken over from a worker whose lease lapsed
        self.beat_at: float | None = None  # the last heartbeat Redis took
        self.leading = False
        self.reports: list[WindowReport] = []
        self._delivered: deque[tuple[float, int]] = deque()  # (time, rollouts) of recent deliveries
        self._started = time.time()
        self._finished = False  # the loop ends
        self._finishing = False  # finish() was called (it may wait for the fleet's last file first)
        self._ticking = anyio.Lock()  # held by the loop while the leader's tick runs (see `finish`)

    # -- indices ------------------------------------------------------------------------------------------
    async def indices(self, window_start: int) -> AsyncGenerator[int, None]:
        """The ProblemSource's index provider: one claim per problem, until the fleet stops the window."""
        while not self.stopping() and self.clock.generation_open(window_start):
            latency = self.plan.latency()
            try:
                taken, cut_at, others = await anyio.to_thread.run_sync(lambda: self._claim(window_start, latency))
            except RedisUnavailable:
                continue
            if cut_at is not None:
                self.plan.fix_cut(window_start, cut_at)
            if not taken:
                if others and self.plan.admit(window_start):  # after the stop: a lease held elsewhere may lapse
                    await anyio.sleep(REISSUE_POLL_S)
                    continue
                return  # the leader's stop passed and nothing can lapse in time, or the window's file is written
            claim = taken[0]
            self.held[window_start].add(claim.index)
            if claim.reissued_from:
                self.claims_reissued += 1
                self.log.info("window %d: claimed index %d, re-issued from %s (its lease lapsed)", window_start,
                              claim.index, claim.reissued_from or "?")
            yield claim.index

    def _claim(self, window_start: int, latency_s: float) -> tuple[list, float | None, bool]:
        """One claim (a worker thread). Spilled groups go first: after an outage their leases have lapsed, and
        merged they end those leases instead of being re-issued and mined twice. The fleet's published cut
        is read with it, so the source admits the next problem only if this worker's latency makes it; with
        no claim, also whether other workers hold leases in the window (one may lapse and be re-issued)."""
        m = self.member
        m.handover.merge_spill()
        taken = m.guard.call(lambda: m.claims.claim(window_start, 1, latency_s), patience_s=CLAIM_RETRY_S)
        try:
            cut_at = m.guard.attempt(lambda: m.plans.cut(window_start)).cut_at
            others = not taken and any(lease.owner != m.worker for lease in
                                       m.guard.attempt(lambda: m.claims.leases(window_start)))
            return taken, cut_at, others
        except RedisUnavailable:
            return taken, None, False  # the claim stands; the cut is read with the next one

    async def last_window(self, window_start: int) -> int | None:
        """The fleet's last window of a `--max-windows` run (ProblemSource's hook, as each window opens); None
        without the option. Redis away: this worker's own count from the first window it saw."""
        if self.max_windows is None:
            return None
        m = self.member
        try:
            first = await anyio.to_thread.run_sync(lambda: m.guard.attempt(lambda: m.plans.first_window(window_start)))
        except RedisUnavailable:
            first = window_start if self._first_window is None else self._first_window
        if self._first_window is None:
            self._first_window = first
            self.log.info("--max-windows %d counts the fleet's windows: %d to %d", self.max_windows, first,
                          first + (self.max_windows - 1) * self.clock.window_blocks)
        return self._first_window + (self.max_windows - 1) * self.clock.window_blocks

    async def _await_fleet_files(self) -> None:
        """The end of a `--max-windows` run: stay in the fleet (the loop goes on beating, renewing and leading)
        until each of the run's windows that has groups has its file, or until the last one's deadline has
        passed by the time a dead writer takes to be noticed."""
        if self.max_windows is None or self._first_window is None:
            return
        m = self.member
        windows = [self._first_window + k * self.clock.window_blocks for k in range(self.max_windows)]
        give_up = self.plan.times(windows[-1]).deadline + self.leader.stale_s

        def unwritten() -> list[int]:
            return [w for w in windows if m.claims.issued(w) and not (m.plans.report(w) or {}).get("file_written")]

        waiting = windows
        while time.time() < give_up and not self.stopping():
            try:
                waiting = await anyio.to_thread.run_sync(lambda: m.guard.attempt(unwritten))
            except RedisUnavailable:
                waiting = windows
            if not waiting:
                return
            await anyio.sleep(m.timings.leader_ttl_s / 3)
        if not self.stopping():
            self.log.warning("the fleet's windows %s have no file at their deadline: leaving", waiting)

    # -- the sink interface -------------------------------------------------------------------------------
    async def put(self, group: SignedGroup) -> None:
        task = group.task
        start = task.window.window_start
        self.plan.finished(task.key)
        if group.dropped:
            again = task.attempt + 1 < MAX_DRAWS and self.redraw(task)
            self.log.info("window %d group %d dropped (%s)%s", start, task.index, group.dropped,
                          ": drawing again" if again else ": released for another worker")
            if not again:
                await self._release(start, [task.index])
            return
        payload = await anyio.to_thread.run_sync(self._payload, group)
        outcome = await anyio.to_thread.run_sync(
            self.member.handover.deliver, StoredGroup(start, task.index, group.rollouts, payload))
        self.held[start].discard(task.index)
        self.outcomes[outcome] += 1
        self._delivered.append((time.time(), group.rollouts))
        self.log.debug("delivered window=%d group=%d rollouts=%d %s (%d KB)", start, task.index, group.rollouts,
                       outcome, len(payload) // 1024)

    @staticmethod
    def _payload(group: SignedGroup) -> bytes:
        rows = GroupRows(records_table(group.records), group.rollouts, group.completion_tokens, sum(group.solved),
                         sum(group.successes), sum(group.rewards), time.time())
        return encode_group(rows)

    async def close_window(self, close: WindowClose) -> None:
        """The source stopped issuing: nothing to write here (the leader writes the file)."""
        self.log.debug("window %d closed for generation here: %d indices claimed", close.window_start,
                       len(close.indices))

    def written(self, window_start: int) -> bool:
        """True: nothing waits here for the daemon's local cut (the leader writes the fleet's file)."""
        return True

    async def cut(self, window_start: int) -> None:
        """The leader cuts (the daemon's local cut has nothing to do in a fleet)."""

    def pending(self) -> dict[int, tuple[int, int | None]]:
        """Nothing is kept here between groups: the fleet's windows are in Redis."""
        return {}

    async def finish(self, reason: str) -> list[WindowReport]:
        """Leave the fleet: hand back unfinished claims and the spill, leave the roster, and write the unwritten
        windows when no other worker is left to."""
        if self._finishing:
            return []
        self._finishing = True
        if reason == "end of run":
            await self._await_fleet_files()
        self._finished = True
        # a leader's tick under way may have sealed a window and not yet begun its write: the daemon cancels the loop
        # and the writes beside it once this returns, so wait for the tick (no other starts: _finished), then for
        # every write it began, each handing its report to the daemon (the solo sink's rule, WindowSink.finish)
        async with self._ticking:
            pass
        await self.leader.writes_done()
        m = self.member
        for start, indices in list(self.held.items()):
            await self._release(start, sorted(indices))
        give_up = time.monotonic() + LEAVE_PATIENCE_S
        while m.handover.spilled and time.monotonic() < give_up:
            await anyio.to_thread.run_sync(m.handover.merge_spill)
            if m.handover.spilled:
                await anyio.sleep(CLAIM_RETRY_S)
        if m.handover.spilled:
            self.log.error("%d signed group(s) stay in the spill %s (Redis is away): another worker merges them, or "
                           "the next start of this one", m.handover.spilled, m.handover.spill.directory)
        try:
            await anyio.to_thread.run_sync(lambda: m.guard.call(m.heartbeats.forget, patience_s=LEAVE_PATIENCE_S))
            others = await anyio.to_thread.run_sync(lambda: m.guard.attempt(self.leader.others))
            if others:
                await anyio.to_thread.run_sync(lambda: m.guard.attempt(m.leader.release))
                self.log.info("left the fleet (%s); %d other worker(s) write the open windows", reason, len(others))
                return []
            self.log.info("the last worker of the fleet is leaving (%s): writing the open windows", reason)
            return await self.leader.write_now(reason)
        except RedisUnavailable as exc:
            self.log.error("left the fleet without writing (%s): %s", reason, exc)
            return []

    async def _release(self, start: int, indices: list[int]) -> None:
        if not indices:
            return
        m = self.member
        try:
            await anyio.to_thread.run_sync(lambda: m.guard.attempt(lambda: m.claims.release(start, indices)))
            self.outcomes["released"] += len(indices)
        except RedisUnavailable:
            pass  # the leases lapse by themselves
        self.held[start].difference_update(indices)

    # -- the loop -----------------------------------------------------------------------------------------
    async def run(self) -> None:
        """Renew, beat, merge, lead: every third of the leader lease (cancelled when the daemon ends)."""
        interval = self.member.timings.leader_ttl_s / 3
        beats = 0
        async with anyio.create_task_group() as writes:  # the leader's file writes, beside this loop
            while not self._finished:
                held = {start: sorted(indices) for start, indices in self.held.items() if indices}
                current = self.clock.window_start(self.clock.block())
                for start in [s for s, indices in self.held.items() if not indices and s < current]:
                    del self.held[start]
                beat = self.beat()  # here, in the event loop: the plan is not thread-safe (a beat built in
                # the Redis thread crashed a worker of the 4 x H200 run: "deque mutated during iteration")
                self.leading, lost = await anyio.to_thread.run_sync(self._keep, held, beat)
                for start, indices in lost.items():
                    self.claims_lost += len(indices)
                    self.held[start].difference_update(indices)
                    self.log.debug("window %d: lost the leases on %s (another worker has them)", start, indices)
                async with self._ticking:  # `finish` waits for a tick under way
                    if self.leading and not self._finished:
                        try:
                            await self.leader.tick(writes.start_soon)
                        except RedisUnavailable:
                            pass  # said once by the guard; the next tick tries again
                beats += 1
                if beats % 3 == 1:
                    await anyio.to_thread.run_sync(lambda: self.status.update(fleet=self.describe()))
                await anyio.sleep(interval)

    def _keep(self, held: dict[int, list[int]], beat: dict[str, Any]) -> tuple[bool, dict[int, list[int]]]:
        """The Redis side of one tick (a worker thread): renew `held`, beat, keep the context alive, merge the
        spill, hold the leader lease. Returns (leading, the leases lost per window)."""
        m = self.member
        lost: dict[int, list[int]] = {}
        try:
            for start, indices in held.items():
                gone = m.guard.attempt(lambda s=start, i=indices: m.claims.renew(s, i))
                if gone:
                    lost[start] = gone
            m.guard.attempt(lambda: m.heartbeats.beat(**beat))
            self.beat_at = time.time()
            m.guard.attempt(m.shared.keep_alive)
            m.handover.merge_spill()
            return bool(m.guard.attempt(m.leader.hold)), lost
        except RedisUnavailable:
            return False, lost

    # -- what others see ----------------------------------------------------------------------------------
    def rate(self, now: float) -> float:
        """Rollouts delivered per second over the last window's length."""
        horizon = self.clock.window_seconds
        while self._delivered and self._delivered[0][0] < now - horizon:
            self._delivered.popleft()
        span = min(horizon, max(1e-3, now - self._started))
        return sum(n for _, n in self._delivered) / span

    def beat(self) -> dict[str, Any]:
        now = time.time()
        return {"host": socket.gethostname(), "pid": os.getpid(), "worker_id": self.worker_id,
                "rollouts_per_s": round(self.rate(now), 3), "latency_s": round(self.plan.latency(now), 3),
                "groups_stored": self.outcomes["stored"], "spilled": self.member.handover.spilled,
                "redis_outage_s": None if self.member.guard.outage_s is None else round(self.member.guard.outage_s, 1),
                "leader": self.leading}

    def describe(self) -> dict[str, Any]:
        """The fleet part of this worker's status file."""
        m = self.member
        return {"worker": m.worker, "leader": self.leading, "claims_held": sum(len(v) for v in self.held.values()),
                "claims_lost": self.claims_lost, "claims_reissued": self.claims_reissued, "groups": dict(self.outcomes),
                "spilled": m.handover.spilled, "beat_at": self.beat_at, "redis_outages": m.guard.outages,
                "redis_outage_s": None if m.guard.outage_s is None else round(m.guard.outage_s, 1)}
