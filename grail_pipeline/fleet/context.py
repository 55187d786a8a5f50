"""What every worker of a fleet must share: the chain clock, the run seed, the checkpoint, each window's facts.

Workers started apart (other machines, restarts) would otherwise disagree on which block is current, which
problems a window has, or which model signs: their groups could not share one file. The first worker to
join publishes its `FleetContext` (SET NX); every later one adopts the fleet's genesis and must match the
rest, or is refused with one line naming both values. A worker on another checkpoint is refused, because a
validator checks every proof of the file against one checkpoint.

The context expires `ttl_s` after the last worker stopped renewing it (`keep_alive`, called with the
heartbeat), so a fleet restarted on a new checkpoint is not refused by its own past. `window_facts` does the
same per window: the first worker's view of the window (block hash, randomness, checkpoint window) is the
fleet's.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from typing import Annotated

import redis
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, with_config
from typing_extensions import TypedDict

from grail_pipeline.common.errors import UserError
from grail_pipeline.common.input_file import parse_json
from grail_pipeline.fleet.keys import FleetKeys

DEFAULT_TTL_S = 120.0


@dataclass(frozen=True)
class FleetContext:
    """The fleet's clock and model. `genesis` None in a proposal: adopt the fleet's (or now, when first)."""

    genesis: float | None
    run_seed: int
    block_time_s: float
    window_blocks: int
    checkpoint: str  # what identifies the weights (e.g. checkpoint name and its metadata's hash)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes, key: str = "the fleet context") -> FleetContext:
        """The context as stored under `key`; what another program (or a damaged server) left there instead is
        one UserError line naming the key and its first problem (_STORED is the rule)."""
        try:
            data = _STORED.validate_json(text)
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            where = ".".join(str(p) for p in first["loc"])
            raise UserError(f"Redis key {key} does not hold a fleet context ({where + ': ' if where else ''}"
                            f"{first['msg'].lower()}): delete it (redis-cli DEL '{key}') and restart the workers") \
                from None
        return cls(**data)


@with_config(ConfigDict(allow_inf_nan=False))
class _StoredContext(TypedDict):
    """What a fleet context's JSON must hold: a finite genesis, a block time above 0 (fleet-status and the clock
    divide by it), at least one block per window."""

    genesis: Annotated[float, Field(ge=0)]
    run_seed: int
    block_time_s: Annotated[float, Field(gt=0)]
    window_blocks: Annotated[int, Field(ge=1)]
    checkpoint: str


_STORED = TypeAdapter(_StoredContext)


def mismatch(mine: FleetContext, fleet: FleetContext) -> str | None:
    """Why a worker proposing `mine` cannot join a fleet on `fleet` (one line), or None when it can."""
    if mine.checkpoint != fleet.checkpoint:
        return (f"this worker loads checkpoint {mine.checkpoint!r} but the fleet mines with {fleet.checkpoint!r}: "
                "start it on the fleet's checkpoint (a window file is checked against one)")
    for name, label in (("run_seed", "run seed"), ("block_time_s", "block time (s)"),
                        ("window_blocks", "window length (blocks)")):
        if getattr(mine, name) != getattr(fleet, name):
            return f"this worker's {label} is {getattr(mine, name)} but the fleet's is {getattr(fleet, name)}"
    if mine.genesis is not None and mine.genesis != fleet.genesis:
        return f"this worker's genesis is {mine.genesis} but the fleet's is {fleet.genesis}"
    return None


class SharedContext:
    """Join a fleet's context (publish it when first), keep it alive, and share each window's facts."""

    def __init__(self, client: redis.Redis, keys: FleetKeys, ttl_s: float = DEFAULT_TTL_S) -> None:
        self.client = client
        self.keys = keys
        self.ttl_ms = int(ttl_s * 1000)

    def join(self, proposal: FleetContext, now: float | None = None) -> FleetContext:
        """The fleet's context: `proposal` (genesis filled in) when this worker is first; else the fleet's,
        if `proposal` matches it. A mismatch is a UserError naming both values."""
        first = proposal if proposal.genesis is not None else replace(
            proposal, genesis=time.time() if now is None else now)
        for _ in range(3):  # the fleet's context may expire between SET NX and GET; try again then
            if self.client.set(self.keys.context, first.to_json(), nx=True, px=self.ttl_ms):
                return first
            try:
                text = self.client.get(self.keys.context)
            except redis.ResponseError as exc:  # WRONGTYPE: another program's key under the fleet's name
                raise UserError(f"Redis key {self.keys.context} is not the fleet's context ({exc}): delete it "
                                f"(redis-cli DEL '{self.keys.context}')") from None
            if text is None:
                continue
            fleet = FleetContext.from_json(text, self.keys.context)
            why = mismatch(proposal, fleet)
            if why:
                raise UserError(f"refused by the fleet of hotkey {self.keys.hotkey}: {why}")
            return fleet
        raise UserError(f"the fleet context of hotkey {self.keys.hotkey} keeps vanishing in Redis")

    def check(self, proposal: FleetContext) -> None:
        """Refuse `proposal` now (the same UserError as `join`) when the fleet's context is another; join nothing.
        A worker asks this before it loads its model, and joins after the load."""
        fleet = self.current()
        why = None if fleet is None else mismatch(proposal, fleet)
        if why:
            raise UserError(f"refused by the fleet of hotkey {self.keys.hotkey}: {why}")

    def keep_alive(self) -> bool:
        """Push the context's expiry out by `ttl_s`; False when it had expired (every worker was gone)."""
        return bool(self.client.pexpire(self.keys.context, self.ttl_ms))

    def current(self) -> FleetContext | None:
        text = self.client.get(self.keys.context)
        return None if text is None else FleetContext.from_json(text, self.keys.context)

    def window_facts(self, window_start: int, proposal: dict, ttl_s: float) -> dict:
        """The fleet's facts for a window (JSON-able): `proposal` when this worker is the first to say, else
        what the first one said. Kept `ttl_s`, long enough for the window's file to be written."""
        key = self.keys.window(window_start).facts
        text = json.dumps(proposal, sort_keys=True)
        if self.client.set(key, text, nx=True, px=int(ttl_s * 1000)):
            return proposal
        stored = self.client.get(key)
        if stored is None:
            return proposal
        facts = parse_json(stored, f"Redis key {key}")
        if not isinstance(facts, dict) or set(facts) != set(proposal):
            raise UserError(f"Redis key {key} does not hold a window's facts (the keys {sorted(proposal)})")
        return facts
