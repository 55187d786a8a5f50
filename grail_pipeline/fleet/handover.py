"""The one path of a signed group from a worker to the fleet: Redis when it answers, else the local spill.

Delivery never blocks the signing stage on a dead server: while `RedisGuard` is in back-off the group goes
straight to the spill, so mining goes on at full speed during an outage; `merge_spill` (called with the
heartbeat) hands spilled groups over once Redis answers again. `spilled` and `outage_s` feed the status
file, so an operator sees groups waiting on disk.
"""

from __future__ import annotations

import logging

from grail_pipeline.fleet.results import LATE, Results, SignedGroup
from grail_pipeline.fleet.retry import RedisGuard, RedisUnavailable
from grail_pipeline.fleet.spill import Spill

log = logging.getLogger(__name__)
SPILLED = "spilled"


class GroupHandover:
    """Deliver signed groups to Redis or the spill; merge the spill back when Redis returns."""

    def __init__(self, results: Results, spill: Spill, guard: RedisGuard) -> None:
        self.results = results
        self.spill = spill
        self.guard = guard
        self.late = 0  # groups refused because their window's file was already written

    def deliver(self, group: SignedGroup) -> str:
        """STORED, DUPLICATE, LATE (see `results`) or SPILLED (on disk, to be merged)."""
        try:
            return self.guard.attempt(lambda: self._put(group))
        except RedisUnavailable:
            self.spill.add(group)
            return SPILLED

    def merge_spill(self) -> int:
        """Hand spilled groups to Redis if it answers; how many went. Quietly 0 while it is still away."""
        if not self.spill.pending():
            return 0
        try:
            merged = self.guard.attempt(lambda: self.spill.merge(self._put))
        except RedisUnavailable:
            return 0
        if merged:
            log.info("handed %d spilled group(s) over to Redis", merged)
        return merged

    def _put(self, group: SignedGroup) -> str:
        outcome = self.results.put(group)
        if outcome == LATE:
            self.late += 1
        return outcome

    @property
    def spilled(self) -> int:
        """Groups on disk waiting for Redis."""
        return len(self.spill.pending())
