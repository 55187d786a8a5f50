"""Every Redis key a fleet uses, named in one place so the scripts, the daemon and the status view agree.

All keys of one hotkey share the hash tag `{hotkey}` (`grail:{5F…}:…`): Redis Cluster puts them in one
slot, which the Lua scripts need (a script may only touch keys of one slot), and two hotkeys' fleets on
one server never see each other's keys.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WindowKeys:
    """The keys of one window: the claim counter and leases, the stored groups, the plan, the written mark."""

    prefix: str

    @property
    def counter(self) -> str:
        """INCR counter: the next never-claimed problem index."""
        return f"{self.prefix}:next"

    @property
    def leases(self) -> str:
        """ZSET index → lease expiry (Redis server time, ms): claimed and not yet stored."""
        return f"{self.prefix}:leases"

    @property
    def owners(self) -> str:
        """HASH index → the worker holding its lease."""
        return f"{self.prefix}:owners"

    @property
    def groups(self) -> str:
        """HASH index → the signed group's bytes, as the worker gave them."""
        return f"{self.prefix}:groups"

    @property
    def rollouts(self) -> str:
        """HASH index → the group's rollout count (read without the payloads)."""
        return f"{self.prefix}:rollouts"

    @property
    def plan(self) -> str:
        """HASH: the leader's cut for the window (`stop_at_ms`, `max_index`, `cut_at_ms`)."""
        return f"{self.prefix}:plan"

    @property
    def facts(self) -> str:
        """STRING (JSON): what the chain says about the window, as the first worker saw it."""
        return f"{self.prefix}:facts"

    @property
    def written(self) -> str:
        """STRING (JSON): the report of the window's file, set once by the worker that wrote it."""
        return f"{self.prefix}:written"

    def all(self) -> tuple[str, ...]:
        return (self.counter, self.leases, self.owners, self.groups, self.rollouts, self.plan, self.facts,
                self.written)


@dataclass(frozen=True)
class FleetKeys:
    """The keys of one hotkey's fleet."""

    hotkey: str
    namespace: str = "grail"

    @property
    def prefix(self) -> str:
        return f"{self.namespace}:{{{self.hotkey}}}"

    @property
    def context(self) -> str:
        """STRING (JSON): the fleet's shared context; expires when no worker renews it."""
        return f"{self.prefix}:context"

    @property
    def leader(self) -> str:
        """STRING: the worker holding the leader lease (SET NX PX)."""
        return f"{self.prefix}:leader"

    @property
    def workers(self) -> str:
        """HASH worker → its last heartbeat (JSON)."""
        return f"{self.prefix}:workers"

    @property
    def run_first_window(self) -> str:
        """STRING: the first window of the fleet's `--max-windows` run (set once, by the first worker to open one)."""
        return f"{self.prefix}:run:first_window"

    def window(self, window_start: int) -> WindowKeys:
        return WindowKeys(f"{self.prefix}:w:{int(window_start)}")
