"""Signed groups in Redis, keyed by window and problem index, stored as the bytes the worker gives.

A group goes to Redis as soon as it is signed, so a worker that dies afterwards loses nothing, and it goes
as one opaque value (e.g. an Arrow IPC buffer of its 16 rows) so nothing is re-encoded field by field. Its
rollout count is stored beside it, so the leader finds the contiguous prefix 0..N−1 and counts what is on
time and what would be cut without reading any payload.

Storing is first-writer-wins: a group re-issued after a lapse and finished by both workers is stored once
(the two are interchangeable: same hotkey, same problem). Storing ends the index's lease whoever held it,
so the other worker's next renewal says it lost the index. Once the window's file is written, a late group
is refused (`put` returns LATE) and counted by the caller, not stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

from grail_pipeline.fleet.keys import FleetKeys

STORED, DUPLICATE, LATE = "stored", "duplicate", "late"

# KEYS: groups, rollouts, leases, owners, written. ARGV: index, rollouts, payload, ttl_ms.
# Returns 1 stored, 0 already there, -1 the window's file is written.
PUT = """
if redis.call('EXISTS', KEYS[5]) == 1 then return -1 end
local stored = redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[3])
if stored == 1 then redis.call('HSET', KEYS[2], ARGV[1], ARGV[2]) end
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[4], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return stored
"""


@dataclass(frozen=True)
class SignedGroup:
    """One problem's signed rollouts, as the bytes the worker encoded, and where they belong."""

    window_start: int
    index: int
    rollouts: int
    payload: bytes


@dataclass(frozen=True)
class WindowPrefix:
    """What the leader writes: groups 0..N−1 in order, and what lies beyond the first gap (cut)."""

    groups: list[SignedGroup]
    cut_groups: int
    cut_rollouts: int

    @property
    def rollouts(self) -> int:
        return sum(g.rollouts for g in self.groups)


class Results:
    """Store signed groups of any window; read a window's counts and its contiguous prefix."""

    def __init__(self, client: redis.Redis, keys: FleetKeys, ttl_s: float, fetch_chunk: int = 64) -> None:
        self.client = client
        self.keys = keys
        self.ttl_ms = int(ttl_s * 1000)
        self.fetch_chunk = fetch_chunk  # payloads per HMGET: bounds one reply's size (a group is ~100s of KB)
        self._put = client.register_script(PUT)

    def put(self, group: SignedGroup) -> str:
        """STORED, DUPLICATE (another worker stored this index first) or LATE (the file is written)."""
        w = self.keys.window(group.window_start)
        code = int(self._put(keys=[w.groups, w.rollouts, w.leases, w.owners, w.written],
                             args=[group.index, group.rollouts, group.payload, self.ttl_ms]))
        return {1: STORED, 0: DUPLICATE, -1: LATE}[code]

    def counts(self, window_start: int) -> dict[int, int]:
        """Index → rollouts of every stored group of the window (no payloads read)."""
        raw = self.client.hgetall(self.keys.window(window_start).rollouts)
        return {int(k): int(v) for k, v in raw.items()}

    def prefix(self, window_start: int) -> WindowPrefix:
        """Groups 0..N−1 where N is the first index not stored, payloads included, in index order."""
        counts = self.counts(window_start)
        n = 0
        while n in counts:
            n += 1
        key = self.keys.window(window_start).groups
        groups: list[SignedGroup] = []
        for lo in range(0, n, self.fetch_chunk):
            chunk = list(range(lo, min(n, lo + self.fetch_chunk)))
            for index, payload in zip(chunk, self.client.hmget(key, chunk)):
                if payload is None:  # expired under us: the prefix ends here
                    break
                groups.append(SignedGroup(window_start, index, counts[index], payload))
            if len(groups) < chunk[-1] + 1:
                break
        cut = {i: c for i, c in counts.items() if i >= len(groups)}
        return WindowPrefix(groups, len(cut), sum(cut.values()))
