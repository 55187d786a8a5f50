"""Problem indices of a window handed to workers as leases, so the index space stays gap-free.

A window file needs groups 0..N−1 with no gap (the validator seeds the i-th group from index i), so every
index handed out must come back as a stored group, or be handed to someone else. Workers take indices from
one atomic counter (a faster GPU simply takes more); each index taken is a lease the worker renews while it
works. An index whose lease lapsed (its worker died, hung or lost its GPU) goes to the next worker that
asks, before any fresh index, lowest first, so the gap it would leave is the first to close. A worker is
never handed back its own lapsed index (it may still be working on it and merely late to renew: `renew`
still succeeds while nobody else took it).

Every step is one Lua script, so two workers never hold one index, and lease times are the Redis server's
clock (`TIME`), so workers on machines with skewed clocks agree on when a lease lapsed. The window's plan
(`plan.WindowPlans`) bounds what is handed out: no fresh index at or beyond `max_index`, and none at all
past `stop_at_ms`; a lapsed index is still re-issued after `stop_at_ms`, while the claiming worker's
latency brings it in before `cut_at_ms` (a dead worker's index left unclaimed ends the file at it: in a
rehearsal, killing the leader after the stop lost index 0 and with it the 32 stored rollouts after it).
Storing a group (`results.Results.put`) ends its lease.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

from grail_pipeline.fleet.keys import FleetKeys

NOW_MS = "local t = redis.call('TIME') local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"

# KEYS: counter, leases, owners, plan, written. ARGV: worker, count, lease_ms, ttl_ms, latency_ms.
# Returns {indices, previous owners ('' for a fresh index)}.
CLAIM = NOW_MS + """
if redis.call('EXISTS', KEYS[5]) == 1 then return {{}, {}} end
local plan = redis.call('HMGET', KEYS[4], 'stop_at_ms', 'max_index', 'cut_at_ms')
local stop, limit, cut = tonumber(plan[1]), tonumber(plan[2]), tonumber(plan[3])
local stopped = stop and now >= stop
if stopped and not (cut and now + tonumber(ARGV[5]) < cut) then return {{}, {}} end
local want, expiry = tonumber(ARGV[2]), now + tonumber(ARGV[3])
local taken, previous = {}, {}
local lapsed = redis.call('ZRANGE', KEYS[2], '-inf', '(' .. now, 'BYSCORE')
if #lapsed > 0 then
  local order = {}
  for i, v in ipairs(lapsed) do order[i] = tonumber(v) end
  table.sort(order)
  for _, index in ipairs(order) do
    if #taken >= want then break end
    local owner = redis.call('HGET', KEYS[3], index) or ''
    if (not limit or index < limit) and owner ~= ARGV[1] then
      previous[#previous + 1] = owner
      redis.call('ZADD', KEYS[2], expiry, index)
      redis.call('HSET', KEYS[3], index, ARGV[1])
      taken[#taken + 1] = index
    end
  end
end
while not stopped and #taken < want do
  local index = redis.call('INCR', KEYS[1]) - 1
  if limit and index >= limit then redis.call('DECR', KEYS[1]) break end
  redis.call('ZADD', KEYS[2], expiry, index)
  redis.call('HSET', KEYS[3], index, ARGV[1])
  taken[#taken + 1] = index
  previous[#previous + 1] = ''
end
for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], ARGV[4]) end
return {taken, previous}
"""

# KEYS: leases, owners. ARGV: worker, lease_ms, indices… Returns the indices this worker no longer holds.
RENEW = NOW_MS + """
local lost = {}
for i = 3, #ARGV do
  local index = ARGV[i]
  if redis.call('HGET', KEYS[2], index) == ARGV[1] and redis.call('ZSCORE', KEYS[1], index) then
    redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[2]), index)
  else
    lost[#lost + 1] = tonumber(index)
  end
end
return lost
"""

# KEYS: leases, owners. ARGV: worker, indices… Lapses this worker's leases now; returns how many.
RELEASE = """
local n = 0
for i = 2, #ARGV do
  if redis.call('HGET', KEYS[2], ARGV[i]) == ARGV[1] and redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[1], 'XX', 0, ARGV[i])
    n = n + 1
  end
end
return n
"""

# KEYS: leases, owners. Returns {server time ms, flat index/expiry pairs, flat index/owner pairs}.
HELD = NOW_MS + """
return {now, redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES'), redis.call('HGETALL', KEYS[2])}
"""


@dataclass(frozen=True)
class Claim:
    """An index this worker now holds; `reissued_from` names the worker whose lease on it had lapsed."""

    index: int
    reissued_from: str | None = None


@dataclass(frozen=True)
class Lease:
    """One outstanding claim as the status shows it: who holds it and how long until it lapses."""

    index: int
    owner: str
    remaining_s: float  # negative: lapsed, free for the next claim


class Claims:
    """This worker's claims on problem indices, per window, as leases of `lease_s` on the server's clock."""

    def __init__(self, client: redis.Redis, keys: FleetKeys, worker: str, lease_s: float, ttl_s: float) -> None:
        self.client = client
        self.keys = keys
        self.worker = worker
        self.lease_ms = max(1, int(lease_s * 1000))
        self.ttl_ms = int(ttl_s * 1000)
        self._claim = client.register_script(CLAIM)
        self._renew = client.register_script(RENEW)
        self._release = client.register_script(RELEASE)
        self._held = client.register_script(HELD)

    def claim(self, window_start: int, count: int = 1, latency_s: float = 0.0) -> list[Claim]:
        """Up to `count` indices: lapsed ones first (lowest first), then fresh ones from the counter. Fewer
        (or none) once the window's plan stops admitting, or once its file is written; after the stop only
        lapsed ones, while `latency_s` (this worker's, for one group) still brings a group in before the cut."""
        w = self.keys.window(window_start)
        taken, previous = self._claim(keys=[w.counter, w.leases, w.owners, w.plan, w.written],
                                      args=[self.worker, int(count), self.lease_ms, self.ttl_ms,
                                            max(0, int(latency_s * 1000))])
        return [Claim(int(i), p.decode() if p else None) for i, p in zip(taken, previous)]

    def renew(self, window_start: int, indices: list[int]) -> list[int]:
        """Extend this worker's leases on `indices`; returns those it no longer holds (stored, or re-issued
        to another worker after lapsing: finishing them is wasted work)."""
        if not indices:
            return []
        w = self.keys.window(window_start)
        return [int(i) for i in self._renew(keys=[w.leases, w.owners], args=[self.worker, self.lease_ms, *indices])]

    def release(self, window_start: int, indices: list[int]) -> int:
        """Hand `indices` back for another worker at once (a draining worker's unfinished claims)."""
        if not indices:
            return 0
        w = self.keys.window(window_start)
        return int(self._release(keys=[w.leases, w.owners], args=[self.worker, *indices]))

    def leases(self, window_start: int) -> list[Lease]:
        """Every outstanding claim of the window, lowest index first."""
        w = self.keys.window(window_start)
        now, scored, owners = self._held(keys=[w.leases, w.owners])
        owner = {int(owners[i]): owners[i + 1].decode() for i in range(0, len(owners), 2)}
        leases = [Lease(int(scored[i]), owner.get(int(scored[i]), "?"), (float(scored[i + 1]) - now) / 1000)
                  for i in range(0, len(scored), 2)]
        return sorted(leases, key=lambda lease: lease.index)

    def issued(self, window_start: int) -> int:
        """How many fresh indices the window's counter has handed out (0..issued−1)."""
        return int(self.client.get(self.keys.window(window_start).counter) or 0)
