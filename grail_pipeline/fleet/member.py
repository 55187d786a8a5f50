"""One worker's membership of a fleet: every fleet part, built on one connection, after the checks that
refuse a worker before it loads a model.

`FleetMember.join` is what the daemon calls when `GRAIL_REDIS_URL` is set: it connects (an unreachable
server is one UserError line), joins the shared context (another checkpoint or clock is one UserError
line) and hands back claims, results, the leader lease, the window plans, heartbeats, the spill and the
guard, all keyed by the hotkey and named by this worker. Without the URL the daemon mines alone and never
builds one.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path

import redis

from grail_pipeline.fleet.claims import Claims
from grail_pipeline.fleet.connection import connect, redacted
from grail_pipeline.fleet.context import FleetContext, SharedContext
from grail_pipeline.fleet.handover import GroupHandover
from grail_pipeline.fleet.keys import FleetKeys
from grail_pipeline.fleet.leader import LeaderLease
from grail_pipeline.fleet.plan import WindowPlans
from grail_pipeline.fleet.results import Results
from grail_pipeline.fleet.retry import RedisGuard
from grail_pipeline.fleet.spill import Spill
from grail_pipeline.fleet.status import FleetView, Heartbeats


@dataclass(frozen=True)
class FleetTimings:
    """How long leases live. A claim lapses `claim_lease_s` after its last renewal (renew every third of it);
    a dead leader is replaced within `leader_ttl_s`; window keys outlive their window by `window_ttl_s`;
    the context outlives the last worker by `context_ttl_s`. Tests use sub-second leases."""

    claim_lease_s: float = 10.0
    leader_ttl_s: float = 5.0
    window_ttl_s: float = 3 * 360.0
    context_ttl_s: float = 120.0
    warn_after_s: float = 3.0


def worker_name() -> str:
    """A name no other process of the fleet has: host, pid and a random part (a restarted worker is new)."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass
class FleetMember:
    """This worker's handle on the fleet; `context` is the fleet's (its genesis may differ from the proposal's)."""

    client: redis.Redis
    keys: FleetKeys
    worker: str
    context: FleetContext
    timings: FleetTimings
    guard: RedisGuard
    shared: SharedContext
    claims: Claims
    results: Results
    leader: LeaderLease
    plans: WindowPlans
    heartbeats: Heartbeats
    handover: GroupHandover

    @classmethod
    def join(cls, url: str, hotkey: str, proposal: FleetContext, spill_dir: str | Path,
             timings: FleetTimings = FleetTimings(), worker: str | None = None) -> FleetMember:
        """Connect, join the context (UserError on refusal) and build the parts; quick, before any model."""
        client = connect(url)
        keys = FleetKeys(hotkey)
        shared = SharedContext(client, keys, timings.context_ttl_s)
        context = shared.join(proposal)
        worker = worker or worker_name()
        guard = RedisGuard(f"Redis at {redacted(url)}", warn_after_s=timings.warn_after_s)
        results = Results(client, keys, timings.window_ttl_s)
        return cls(client=client, keys=keys, worker=worker, context=context, timings=timings, guard=guard,
                   shared=shared, claims=Claims(client, keys, worker, timings.claim_lease_s, timings.window_ttl_s),
                   results=results, leader=LeaderLease(client, keys, worker, timings.leader_ttl_s),
                   plans=WindowPlans(client, keys, timings.window_ttl_s), heartbeats=Heartbeats(client, keys, worker),
                   handover=GroupHandover(results, Spill(spill_dir), guard))

    def view(self) -> FleetView:
        return FleetView(self.client, self.keys, self.claims, self.results, self.plans)
