"""A window's course shared by the whole fleet: when it stops admitting problems, and who sealed its file.

The stop decision must be one for all workers: a worker that kept claiming after the leader decided the
file is cut would burn GPU time on groups that cannot make it. The leader publishes the window's cut
(`stop_at`, a unix time compared with the Redis server's clock, and/or `max_index`, the first index not
admitted); `claims.Claims.claim` refuses indices past it, and workers read it to stop early. With it the
leader publishes `cut_at`, when the file starts being written: a worker admits a claim only when its own
measured latency brings the group in before it (mining/deadline.py `fix_cut`), and once `stop_at` has
passed neither moves again, so a group admitted before the stop on the fleet's slowest latency is in the file.

Writing the file is two steps so nothing lands in between unseen: `seal` (first caller wins) makes Redis
refuse late groups and claims, the sealer then reads the prefix, writes the file and calls `record_written`
with the report the status shows. A leader that took over after another sealed but died before writing
sees a seal without a file (`needs_file`) and writes it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import redis

from grail_pipeline.fleet.keys import FleetKeys


@dataclass(frozen=True)
class Cut:
    """Where a window stops admitting problems; None fields: no limit of that kind published (yet)."""

    stop_at: float | None = None  # unix seconds
    max_index: int | None = None
    cut_at: float | None = None  # unix seconds: the file starts being written; later groups are cut

    def admits(self, index: int, now: float) -> bool:
        return ((self.stop_at is None or now < self.stop_at)
                and (self.max_index is None or index < self.max_index))


class WindowPlans:
    """Publish and read each window's cut; seal the window and record its written file."""

    def __init__(self, client: redis.Redis, keys: FleetKeys, ttl_s: float) -> None:
        self.client = client
        self.keys = keys
        self.ttl_ms = int(ttl_s * 1000)

    def publish(self, window_start: int, stop_at: float | None = None, max_index: int | None = None,
                cut_at: float | None = None) -> None:
        """The leader's cut for the window (fields left None keep what was published before)."""
        fields = {}
        if stop_at is not None:
            fields["stop_at_ms"] = int(stop_at * 1000)
        if max_index is not None:
            fields["max_index"] = int(max_index)
        if cut_at is not None:
            fields["cut_at_ms"] = int(cut_at * 1000)
        if not fields:
            return
        key = self.keys.window(window_start).plan
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping=fields).pexpire(key, self.ttl_ms).execute()

    def cut(self, window_start: int) -> Cut:
        stop_ms, max_index, cut_ms = self.client.hmget(self.keys.window(window_start).plan,
                                                       ["stop_at_ms", "max_index", "cut_at_ms"])
        return Cut(None if stop_ms is None else int(stop_ms) / 1000, None if max_index is None else int(max_index),
                   None if cut_ms is None else int(cut_ms) / 1000)

    def seal(self, window_start: int, worker: str) -> bool:
        """Close the window to claims and groups; True when this call sealed it, False when it already was."""
        key = self.keys.window(window_start).written
        return bool(self.client.set(key, json.dumps({"sealed_by": worker}), nx=True, px=self.ttl_ms))

    def first_window(self, window_start: int) -> int:
        """The first window of a `--max-windows` run of the fleet: the first caller's `window_start` (SET NX),
        the same answer for every worker, so all mine the same windows and stop together."""
        key = self.keys.run_first_window
        with self.client.pipeline(transaction=True) as pipe:  # each window's call keeps it for the run's length
            _, _, first = pipe.set(key, int(window_start), nx=True).pexpire(key, self.ttl_ms).get(key).execute()
        return int(first)

    def record_written(self, window_start: int, report: dict) -> None:
        """The file is written: keep its report (file name, on-time and cut rollouts, margin) for the status."""
        key = self.keys.window(window_start).written
        previous = self.report(window_start) or {}
        self.client.set(key, json.dumps({**previous, **report, "file_written": True}), px=self.ttl_ms)

    def report(self, window_start: int) -> dict | None:
        """The window's seal and written report; None while it is open."""
        text = self.client.get(self.keys.window(window_start).written)
        return None if text is None else json.loads(text)

    def needs_file(self, window_start: int) -> bool:
        """Sealed but no file recorded: the sealer died between the two steps."""
        report = self.report(window_start)
        return report is not None and not report.get("file_written")
