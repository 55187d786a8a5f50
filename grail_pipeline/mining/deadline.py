"""When a window's file is due, and whether one more problem can still make it: the deadline plan.

The validator ignores a window file modified after the chain time of block `window_start + 30` minus 4 s
(grail-protocol.md §2, `DEADLINE_SLACK_SECONDS`), and a real miner must also upload it before then. The
fork stops generating a fixed number of blocks before the window's end (GRAIL_MINER_SAFETY_BLOCKS), which
is either too early (idle GPU) or too late: on the H100 at 512 slots our window-0 file landed 33 s after
the deadline, because groups admitted in the last block still had ~20 s of generation, proof and signing
ahead of them and the file took seconds to write.

This plan works from what it measures instead:
- the latency of a group, from the moment it is admitted to the moment its signed rows reach the sink
  (queue wait, generation, proof, signing), as a high quantile of the groups that finished within the
  last window, and never less than the age of the oldest group still in flight (so the first window, before anything finished, is
  not planned on nothing);
- the time to write the file, per rollout, from the previous write;
- the upload allowance: a fixed `--upload-allowance` or, by default, the expected file size (bytes per
  rollout of the last file × the rollouts the window will hold) at `UPLOAD_MBIT_S`.
A problem is admitted while `now + latency` still ends before the cut (with nothing in flight, until the
cut itself: the GPU is idle, and the group measures the latency anew), the moment the file must start
being written: `deadline − upload allowance − write time − margin`. At the cut the sink writes whatever
contiguous prefix of groups has arrived; a group that arrives later is cut and counted.

In a fleet the cut is the fleet's, not this worker's: the leader estimates it for the fleet's larger file
(`estimated_cut` with the fleet's summed rate: a 4-GPU fleet's file takes ~4x the upload allowance and write
time) and publishes it; every worker then `fix_cut`s it, so its `admit` lets a group in only when its own
measured latency brings the group to Redis before the fleet's cut (a worker's own estimate, with no rate
of its own, put its cut ~1.5 s before the deadline: 35 s after the fleet's in the 4 x H200 run of
bench/results/h200-x4-2026-11-27/fleet).

A fleet worker's plan is also queue-aware (`cold_start_groups` set; a solo worker's is not, unchanged): a
worker claims a group the moment its pipeline's intake has room, so at a window's start its queues fill
with groups all admitted at "latency 0", and later ones are admitted on the latency of groups that had an
empty queue ahead of them. Measured on two shared CPU cores (tests/test_fleet_takeover.py, three workers,
24-s windows, default queues): 368 of 448 generated rollouts of window 0 were cut. So, for a fleet worker:
- while no group has finished within the last window, at most `cold_start_groups` (one engine batch) are in
  flight; the source holds the next one (`saturated`) until the first finishes and measures the latency;
- the latency of a group admitted now is at least (groups in flight + 1) / the rate groups finish at
  (Little's law: it waits behind every group in flight), the rate measured over the recent finishes while the
  pipeline was busy (after the first finish only: one batch per measured latency). In that test the first group took 3 s and the
  worker then claimed 7 more at once on "latency 3 s": they took 3 s each, one after the other.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from grail_pipeline.protocol.profile import PROFILE
from grail_pipeline.protocol.records import ROW_GROUP_ROWS

UPLOAD_MBIT_S = 100.0  # the upload bandwidth the default allowance assumes (the fork's GRAIL_UPLOAD_BANDWIDTH_MBPS)
FIRST_BYTES_PER_ROLLOUT = 40_000  # before a file was written: W1's rollouts compress to ~40 KB each with zstd
LATENCY_QUANTILE = 0.95
LATENCY_HISTORY = 256  # groups the quantile looks back over, at most
LATENCY_MAX_AGE_WINDOWS = 1.0  # and only those that finished within the last window: a cold start or a slow
# window (in CPU tests, a first group with its compiles took 25 s against 2 s later) must not hold admissions
# back for ever once nothing new is measured
WRITE_FLOOR_S = 0.5  # the write estimate before a file was written, and its minimum
MARGIN_S = 1.0  # slack for what the plan cannot see (a GC pause, an fsync on a busy disk)


@dataclass(frozen=True)
class WindowTimes:
    """A window's fixed points on the wall clock (unix seconds)."""

    window_start: int
    opens: float  # block window_start begins: its hash, and so its problems, exist from now on
    ends: float  # block window_start + window length begins
    deadline: float  # the validator's: the file's modification time must not be later

    def as_dict(self) -> dict[str, float]:
        return {"opens": round(self.opens, 3), "ends": round(self.ends, 3), "deadline": round(self.deadline, 3)}


class DeadlinePlan:
    """Measures group latency, write time and file size, and answers "admit one more?" and "cut when?".

    `time_of_block` is the chain clock's (simulated or real); `upload_allowance_s` None is the measured
    default. Thread-safe enough for its use: every method is called from the event loop thread.
    """

    def __init__(self, time_of_block: Callable[[int], float], window_blocks: int, *,
                 upload_allowance_s: float | None = None, margin_s: float = MARGIN_S,
                 time_fn: Callable[[], float] = time.time, cold_start_groups: int | None = None,
                 target_rollouts: int | None = None) -> None:
        self.time_of_block = time_of_block
        self.window_blocks = window_blocks
        self.upload_allowance_s = upload_allowance_s
        self.margin_s = margin_s
        self.time_fn = time_fn
        self._latencies: deque[tuple[float, float]] = deque(maxlen=LATENCY_HISTORY)  # (finished at, seconds)
        self._max_age_s = LATENCY_MAX_AGE_WINDOWS * (time_of_block(window_blocks) - time_of_block(0))
        self._in_flight: dict[object, float] = {}
        self._write_s_per_rollout: float | None = None
        self._file_grows = False  # the last file was written as it grew: a write encodes a row group at most
        self._bytes_per_rollout: float = FIRST_BYTES_PER_ROLLOUT
        self._rollouts_per_s: float | None = None
        self._fixed_cuts: dict[int, float] = {}  # window start -> the fleet's published cut
        self.cold_start_groups = cold_start_groups  # set: a fleet worker's queue-aware plan (see the module)
        self.target_rollouts = target_rollouts  # a file never holds more (mining/fill.py): its upload is no longer

    # -- the window's fixed points ----------------------------------------------------------------------
    def times(self, window_start: int) -> WindowTimes:
        ends = self.time_of_block(window_start + self.window_blocks)
        return WindowTimes(window_start, self.time_of_block(window_start), ends, ends - PROFILE.upload_deadline_slack_s)

    # -- measurements -----------------------------------------------------------------------------------
    def admitted(self, key: object, when: float | None = None) -> None:
        self._in_flight[key] = self.time_fn() if when is None else when

    def finished(self, key: object, when: float | None = None) -> None:
        """A group reached the sink (signed, dropped or cut: all of them took the pipeline's time)."""
        start = self._in_flight.pop(key, None)
        if start is not None:
            end = self.time_fn() if when is None else when
            self._latencies.append((end, end - start))

    def in_flight(self) -> int:
        """Groups admitted that have not reached the sink."""
        return len(self._in_flight)

    def forget(self, key: object) -> None:
        """A group that will never reach the sink (the daemon stopped)."""
        self._in_flight.pop(key, None)

    def wrote(self, rollouts: int, seconds: float, nbytes: int, rows_at_write: int | None = None) -> None:
        """A file of `rollouts` rows and `nbytes` took `seconds` to write, encoding `rows_at_write` of its rows then
        (None: all; fewer when the file was written as it grew, protocol/records.py's WindowFileWriter). The cost
        per row is learnt from writes of a quarter row group or more (a shorter tail is mostly footer and fsync)."""
        if rollouts > 0:
            self._bytes_per_rollout = nbytes / rollouts
            rows = rollouts if rows_at_write is None else rows_at_write
            if rows_at_write is None or rows >= ROW_GROUP_ROWS // 4:
                self._write_s_per_rollout = seconds / max(rows, 1)
            self._file_grows = rows_at_write is not None

    def rate(self, rollouts_per_s: float) -> None:
        """The window's generation rate so far (rollouts reaching the sink per second)."""
        if rollouts_per_s > 0:
            self._rollouts_per_s = rollouts_per_s

    # -- estimates --------------------------------------------------------------------------------------
    def latency(self, now: float | None = None) -> float:
        """Seconds a group admitted now needs to reach the sink."""
        now = self.time_fn() if now is None else now
        oldest = max((now - t for t in self._in_flight.values()), default=0.0)
        while self._latencies and self._latencies[0][0] < now - self._max_age_s:
            self._latencies.popleft()
        if not self._latencies:
            return oldest
        recent = list(self._latencies)
        ordered = sorted(seconds for _, seconds in recent)
        quantile = ordered[min(len(ordered) - 1, math.ceil(LATENCY_QUANTILE * len(ordered)) - 1)]
        if self.cold_start_groups is None:
            return max(quantile, oldest)
        # seconds per finished group: the mean gap between consecutive finishes, leaving out gaps longer than a
        # group's latency (the pipeline was idle, e.g. between windows: counted, they stopped a fleet's claims
        # 3 s into a 24-s window); with no such gap yet, one batch per measured latency
        ends = sorted(end for end, _ in recent)
        busy = [b - a for a, b in zip(ends, ends[1:]) if b - a <= quantile]
        per_group = sum(busy) / len(busy) if busy and sum(busy) > 0 else quantile / self.cold_start_groups
        queued = (len(self._in_flight) + 1) * per_group  # Little's law: behind every group in flight
        return max(quantile, oldest, queued)

    def saturated(self, now: float | None = None) -> bool:
        """A fleet worker's cold start: one engine batch is in flight and no group finished within the last
        window, so the latency of one more is not known yet: the source holds it until the first finishes."""
        if self.cold_start_groups is None or len(self._in_flight) < self.cold_start_groups:
            return False
        now = self.time_fn() if now is None else now
        return not any(end >= now - self._max_age_s for end, _ in list(self._latencies))

    def expected_rollouts(self, window_start: int) -> float:
        times = self.times(window_start)
        if self._rollouts_per_s is None:
            return 0.0
        expected = self._rollouts_per_s * max(0.0, times.deadline - times.opens)
        return expected if self.target_rollouts is None else min(expected, float(self.target_rollouts))

    def upload_allowance(self, window_start: int) -> float:
        """Seconds reserved before the deadline for the upload a real miner would make."""
        if self.upload_allowance_s is not None:
            return self.upload_allowance_s
        nbytes = self._bytes_per_rollout * self.expected_rollouts(window_start)
        return nbytes * 8 / (UPLOAD_MBIT_S * 1e6)

    def write_time(self, window_start: int) -> float:
        if self._write_s_per_rollout is None:
            return WRITE_FLOOR_S
        rows = self.expected_rollouts(window_start)
        if self._file_grows:  # the rows of the window's last row group, at most, are left for the write
            rows = min(rows, ROW_GROUP_ROWS)
        return max(WRITE_FLOOR_S, self._write_s_per_rollout * rows)

    def estimated_cut(self, window_start: int) -> float:
        """This plan's own estimate of when the file must start being written."""
        return (self.times(window_start).deadline - self.upload_allowance(window_start)
                - self.write_time(window_start) - self.margin_s)

    def fix_cut(self, window_start: int, when: float) -> None:
        """Take the fleet's cut for the window (published by its leader) instead of this plan's estimate."""
        self._fixed_cuts[window_start] = when
        for old in [w for w in self._fixed_cuts if w < window_start - 2 * self.window_blocks]:
            del self._fixed_cuts[old]

    def cut(self, window_start: int) -> float:
        """When the file starts being written: what has arrived by then is in it, the rest is cut. A fleet's
        published cut when one was fixed, else this plan's estimate (a solo worker's always)."""
        fixed = self._fixed_cuts.get(window_start)
        return self.estimated_cut(window_start) if fixed is None else fixed

    def last_call(self, window_start: int) -> float:
        """The latest moment a write of the file can start and still land before the deadline (no upload
        allowance): a file still missing then is written by whoever can."""
        return self.times(window_start).deadline - self.write_time(window_start) - self.margin_s

    def admit(self, window_start: int, now: float | None = None) -> bool:
        """Can a group admitted now reach the sink before the window's cut? With nothing in flight the answer
        is yes until the cut itself: the GPU would idle anyway, and the group refreshes a latency that was
        measured under other conditions (a cold start, a slower window)."""
        now = self.time_fn() if now is None else now
        if not self._in_flight:
            return now < self.cut(window_start)
        return now + self.latency(now) <= self.cut(window_start)

    def describe(self, window_start: int) -> dict[str, float]:
        """The plan's numbers for a window, for the log and the status file."""
        return {"latency_s": round(self.latency(), 3), "write_s": round(self.write_time(window_start), 3),
                "upload_allowance_s": round(self.upload_allowance(window_start), 3),
                "cut": round(self.cut(window_start), 3), **self.times(window_start).as_dict()}
