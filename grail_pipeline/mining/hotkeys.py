"""Several hotkeys mined from one loaded model and one engine: one Daemon unit per hotkey, one pipeline.

Each hotkey keeps everything it would have alone (mining/daemon.py): its clock, deadline plan, source (problems
seeded by its own address), sink (its own `{hotkey}-window-{start}.parquet`, groups 0..N−1), status file, cut
timers and heartbeat. They share the engine, the prover and the pipeline: the sources' tasks are merged into the
pipeline's intake, each source holding while a hotkey listed before it fills its target (mining/fill.py), and
each group is signed by its own hotkey's signer and handed to its own hotkey's sink by `task.hotkey`, so a file
never holds another hotkey's rollouts (a group of a hotkey not served here is an error, not a guess). One stop
signal stops every source; one self-check process checks every hotkey's sample.

In a fleet (GRAIL_REDIS_URL) every worker serves the same hotkeys, and each unit is this worker's member of its
hotkey's fleet, exactly as a one-hotkey worker is (mining/fleet_worker.py): the hotkey's own claims, stored
groups, leader lease, plan and file, under its own Redis keys (fleet/keys.py) and its own spill folder, so a
hotkey's window gets the one file with groups 0..N−1 from every worker's claims, and a dead worker's claims of
any hotkey are re-issued. A fleet's units have no target (a target stops one worker's window, cli/mine.py
refuses it), so the sources share the engine in turn instead of in fill order. --checkpoint-dir serves one
hotkey per process (cli/mine.py refuses it here).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
from anyio.abc import ObjectSendStream, TaskGroup

from grail_pipeline.fleet.member import FleetMember
from grail_pipeline.inference.engine import Engine
from grail_pipeline.mining.daemon import Daemon
from grail_pipeline.mining.fill import FillOrder
from grail_pipeline.mining.messages import ProblemTask, ProvedGroup, SignedGroup
from grail_pipeline.mining.pipeline import GroupSink, Pipeline
from grail_pipeline.mining.runtime import Runtime
from grail_pipeline.mining.settings import MineSettings
from grail_pipeline.mining.source import ProblemSource
from grail_pipeline.mining.status import StatusFile
from grail_pipeline.protocol.wallet import Signer


class RoutedSigner:
    """The pipeline's signing step: each group signed by the signer of the hotkey it was mined for."""

    def __init__(self, signers: dict[str, Callable[[ProvedGroup], SignedGroup]]) -> None:
        self.signers = signers

    def __call__(self, group: ProvedGroup) -> SignedGroup:
        return self.signers[group.task.hotkey](group)


class RoutedSink:
    """The pipeline's sink: each group to the sink of the hotkey it was mined for."""

    def __init__(self, sinks: dict[str, GroupSink]) -> None:
        self.sinks = sinks

    async def put(self, group: SignedGroup) -> None:
        await self.sinks[group.task.hotkey].put(group)


async def _pump(source: ProblemSource, send: ObjectSendStream[ProblemTask]) -> None:
    """One hotkey's tasks into the shared intake (unbuffered: a task waits here only while the intake is full,
    as it would in a pipeline of its own)."""
    async with send:
        async for task in source.tasks():
            await send.send(task)


class HotkeysDaemon(Daemon):
    """The first hotkey's unit, which runs the other hotkeys' units (`peers`) on its engine and pipeline.

    Warm-up, signals and the drain are the first unit's, applied to every unit. `fleets`: each hotkey's fleet
    membership, in the order of `signers` (None: every hotkey mined alone).
    """

    def __init__(self, settings: MineSettings, runtime: Runtime, signers: list[Signer], engine: Engine,
                 batch_size: int, statuses: list[StatusFile], fill: FillOrder | None,
                 fleets: list[FleetMember] | None = None) -> None:
        members: list[FleetMember | None] = list(fleets) if fleets is not None else [None] * len(signers)
        assert len(members) == len(signers) == len(statuses)
        super().__init__(settings, runtime, signers[0], engine, batch_size, statuses[0], fleet=members[0])
        self.peers = [Daemon(settings, runtime, signer, engine, batch_size, status, fleet=member)
                      for signer, status, member in zip(signers[1:], statuses[1:], members[1:])]
        for unit in self.units:
            unit.fill = fill

    @property
    def units(self) -> list[Daemon]:
        return [self, *self.peers]

    async def _mine(self, tg: TaskGroup) -> None:
        units = self.units
        sign = RoutedSigner({u.signer.ss58_address: self.runtime.group_signer(u.signer) for u in units})
        pipeline = Pipeline(self.engine, self.runtime.prover(), sign, self.pipeline_config())
        opened = [await unit._open(tg, pipeline) for unit in units]
        sink = RoutedSink({u.signer.ss58_address: s for u, (_, s) in zip(units, opened)})
        async with anyio.create_task_group() as checks:
            if self.settings.verify_sample:
                send, receive = anyio.create_memory_object_stream[tuple[Daemon, int, list[dict]]](2 * len(units))
                for unit in units:
                    unit._self_check = send.clone()
                send.close()
                checks.start_soon(self._self_check_worker, receive)
            try:
                intake, tasks = anyio.create_memory_object_stream[ProblemTask](0)
                async with anyio.create_task_group() as pumps:
                    async with intake:
                        for source, _ in opened:
                            pumps.start_soon(_pump, source, intake.clone())
                    async with tasks:
                        await pipeline.run(tasks, sink)
                for _, unit_sink in opened:
                    await unit_sink.finish("end of run")  # nothing is left after a clean drain
            finally:
                for unit in units:
                    if unit._self_check is not None:
                        unit._self_check.close()
        for unit in units:
            unit._log_stopped()

    def _stop_intake(self, reason: str) -> None:
        for unit in self.units:
            Daemon._stop_intake(unit, reason)

    def _update_statuses(self, **fields: Any) -> None:
        for unit in self.units:
            Daemon._update_statuses(unit, **fields)

    async def _finish_sinks(self, reason: str) -> None:
        for unit in self.units:
            await Daemon._finish_sinks(unit, reason)
