"""The fleet in one view: each worker's heartbeat (rate, claims, lease age, Redis outage, spill) and, per
window, what was issued, stored, on time and cut.

Each worker's daemon beats every few seconds (`Heartbeats.beat`, stamped with the Redis server's clock so
ages are comparable across machines); `FleetView.snapshot` gathers everything an operator asks about a
fleet into one JSON-able dict, for `grail-pipeline fleet-status` or the leader's status file.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Annotated

import redis
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, with_config
from typing_extensions import Required, TypedDict

from grail_pipeline.fleet.claims import Claims
from grail_pipeline.fleet.keys import FleetKeys
from grail_pipeline.fleet.plan import WindowPlans
from grail_pipeline.fleet.results import Results

# KEYS: workers. ARGV: worker, beat (JSON object). Stamps it with the server time.
BEAT = """
local t = redis.call('TIME')
local beat = cjson.decode(ARGV[2])
beat['at_ms'] = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(beat))
"""


@with_config(ConfigDict(extra="allow", allow_inf_nan=False))
class _StoredBeat(TypedDict, total=False):
    """What a heartbeat in the fleet's hash must hold for the leader and fleet-status to read it: the server's
    stamp, and numbers where numbers are read (Heartbeats.beat's fields; others are kept as they are)."""

    at_ms: Required[int]
    worker_id: int
    pid: int
    host: str
    rollouts_per_s: Annotated[float, Field(ge=0)]
    latency_s: Annotated[float, Field(ge=0)]
    groups_stored: int
    spilled: int
    redis_outage_s: float | None
    leader: bool


_BEAT = TypeAdapter(_StoredBeat)


def server_now_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


class Heartbeats:
    """This worker's heartbeat, and everybody's, as the server's clock ages them."""

    def __init__(self, client: redis.Redis, keys: FleetKeys, worker: str) -> None:
        self.client = client
        self.keys = keys
        self.worker = worker
        self._beat = client.register_script(BEAT)
        self.unreadable: dict[str, str] = {}  # worker → why its last beat could not be read (filled by `read`)

    def beat(self, **fields: object) -> None:
        """Publish this worker's state: e.g. host, pid, rollouts_per_s, groups_stored, spilled, redis_outage_s."""
        self._beat(keys=[self.keys.workers], args=[self.worker, json.dumps(fields)])

    def forget(self) -> None:
        """Leave the roster (a worker that drains and exits)."""
        self.client.hdel(self.keys.workers, self.worker)

    def read(self) -> dict[str, dict]:
        """worker → its last beat, with `age_s` on the server's clock. A beat that is not one (garbage left in
        the fleet's hash) is left out, and why is kept in `unreadable`: a worker that cannot be read is not alive."""
        now = server_now_ms(self.client)
        beats = {}
        self.unreadable = {}
        for worker, text in self.client.hgetall(self.keys.workers).items():
            name = worker.decode(errors="backslashreplace")
            try:
                beat = dict(_BEAT.validate_json(text))
            except ValidationError as exc:
                first = exc.errors(include_url=False)[0]
                where = ".".join(str(p) for p in first["loc"])
                self.unreadable[name] = f"not a heartbeat ({where + ': ' if where else ''}{first['msg'].lower()})"
                continue
            beat["age_s"] = (now - beat.pop("at_ms")) / 1000
            beats[name] = beat
        return beats


class FleetView:
    """Everything `fleet-status` shows, read from Redis."""

    def __init__(self, client: redis.Redis, keys: FleetKeys, claims: Claims, results: Results,
                 plans: WindowPlans) -> None:
        self.client = client
        self.keys = keys
        self.claims = claims
        self.results = results
        self.plans = plans

    def window(self, window_start: int) -> dict:
        """Issued, stored, on-time (the contiguous prefix) and cut groups and rollouts, leases, the cut and
        the written report (which holds the margin to the deadline) of one window."""
        counts = self.results.counts(window_start)
        n = 0
        while n in counts:
            n += 1
        leases = self.claims.leases(window_start)
        cut = self.plans.cut(window_start)
        return {
            "window_start": window_start,
            "issued": self.claims.issued(window_start),
            "stored_groups": len(counts),
            "on_time_groups": n,
            "on_time_rollouts": sum(counts[i] for i in range(n)),
            "cut_rollouts": sum(c for i, c in counts.items() if i >= n),
            "leases": len(leases),
            "lapsed": [lease.index for lease in leases if lease.remaining_s < 0],
            "stop_at": cut.stop_at,
            "max_index": cut.max_index,
            "report": self.plans.report(window_start),
        }

    def snapshot(self, windows: list[int]) -> dict:
        """The leader, each worker (beat, claims held and its oldest lease's time left) and each window.

        A worker is the leader when it holds the leader lease now, whatever its last beat said: a killed
        leader's beat (`"leader": true`) stays until it ages out, beside the new holder's."""
        held: dict[str, list[float]] = defaultdict(list)
        for window_start in windows:
            for lease in self.claims.leases(window_start):
                held[lease.owner].append(lease.remaining_s)
        heartbeats = Heartbeats(self.client, self.keys, "")
        workers = heartbeats.read()
        value = self.client.get(self.keys.leader)
        leader = None if value is None else value.decode(errors="backslashreplace")
        for worker, beat in workers.items():
            beat["claims"] = len(held.get(worker, ()))
            beat["soonest_lease_s"] = min(held[worker]) if held.get(worker) else None
            beat["leader"] = worker == leader
        return {"leader": leader, "workers": workers, "unreadable_workers": heartbeats.unreadable,
                "windows": [self.window(w) for w in windows]}
