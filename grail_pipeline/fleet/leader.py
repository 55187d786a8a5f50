"""The leader lease: which one worker of the fleet writes the window files, and its replacement when it dies.

The fork's hub was a fixed node: when it died (or produced nothing itself) nobody's rollouts were written.
Here any worker can lead. The lease is one key taken with SET NX PX and renewed by its holder well inside
its time to live; renewal and release are Lua compare-and-act scripts, so a worker whose lease already
passed to another can never extend or delete the new holder's. When the leader stops renewing (killed,
hung), the key expires after `ttl_s` and the next worker's `hold()` takes it: the window is still written
on time if `ttl_s` is a few seconds, well inside the margin the plan keeps before the deadline.
"""

from __future__ import annotations

import redis

from grail_pipeline.fleet.keys import FleetKeys

# KEYS: leader. ARGV: worker, ttl_ms.
RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
# KEYS: leader. ARGV: worker.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class LeaderLease:
    """This worker's side of the fleet's leader lease."""

    def __init__(self, client: redis.Redis, keys: FleetKeys, worker: str, ttl_s: float) -> None:
        self.client = client
        self.key = keys.leader
        self.worker = worker
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self._renew = client.register_script(RENEW)
        self._release = client.register_script(RELEASE)

    def acquire(self) -> bool:
        """Take the lease if nobody holds it (SET NX PX)."""
        return bool(self.client.set(self.key, self.worker, nx=True, px=self.ttl_ms))

    def renew(self) -> bool:
        """Extend the lease if this worker still holds it; False when it lapsed or passed to another."""
        return bool(self._renew(keys=[self.key], args=[self.worker, self.ttl_ms]))

    def hold(self) -> bool:
        """Renew when held, else try to take it: the one call a worker makes every `ttl_s`/3. True: lead."""
        return self.renew() or self.acquire()

    def release(self) -> bool:
        """Give the lease up now (a draining leader), only if this worker holds it."""
        return bool(self._release(keys=[self.key], args=[self.worker]))

    def holder(self) -> str | None:
        value = self.client.get(self.key)
        return None if value is None else value.decode(errors="backslashreplace")  # another program's bytes
