"""The window sink: signed groups in, the hotkey's one window file out, complete and on time.

The file is the one the validator reads (grail-protocol.md §5): `{hotkey}-window-{start}.parquet`,
groups 0..N−1 contiguous and in order (F seeds the group at file position i from problem index i, so a
gap or a swap fails every group after it), every group whole. Groups arrive in any order; each is kept
as an Arrow table (a tenth of the memory of the record dicts) until the window is written:
- when every issued index is resolved (it arrived, or it could not be completed), or
- at the window's cut (`cut`, called by the daemon at the deadline plan's cut time), whatever has
  arrived by then: the longest contiguous prefix 0..k−1 goes in, anything after a gap and anything
  still in flight is cut and counted, or
- at `finish` (a stop, an error): what arrived, marked partial.
A dropped group (a completion under the challenge size) is redrawn for the same index (`redraw`, the
source's) up to `MAX_DRAWS` times; an index that still fails ends the file before it, and the report
says how many rollouts after it that cost. The file is written as the contiguous prefix grows (its full
row groups under a temporary name, `_encode`), so a write adds only the last row group and the footer.
Then fsync and rename: after any stop, even SIGKILL, a file under the final name is complete. A window
with no rollout in its prefix gets no file: a 0-row file scores nothing and only hides, in `verify`, that
the window was lost.

Every generated group is counted once: in the file, cut at the write (after a gap, or issued and still
in flight: `missing_groups`, 16 rollouts each), or, arriving after the write without having been counted
there (the cut found the window still issuing, or found nothing), handed to `on_late` for the status.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import anyio
import pyarrow as pa

from grail_pipeline.common.atomic import stale_temporaries
from grail_pipeline.mining.chain import WindowContext, WorkerSlot
from grail_pipeline.mining.deadline import DeadlinePlan
from grail_pipeline.mining.hotkey_log import Log
from grail_pipeline.mining.messages import ProblemTask, SignedGroup
from grail_pipeline.mining.source import WindowClose
from grail_pipeline.protocol.profile import PROFILE
from grail_pipeline.protocol.records import WindowFileWriter, records_table, table_records

logger = logging.getLogger("grail_pipeline")

MAX_DRAWS = 3  # samples of one index before the file ends at it (a real model that keeps stopping early)


def remove_stale_temporaries(out_dir: str | Path, hotkey: str) -> list[Path]:
    """Delete the temporaries a killed run for this hotkey left in `out_dir` (other hotkeys' are kept).

    A temporary is `.{final name}.{random}.tmp`, so it names its window file and thus its hotkey.
    """
    prefix = f".{hotkey}-window-"
    removed = []
    for path in stale_temporaries(out_dir):
        if path.name.startswith(prefix):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def window_checkpoint(window: WindowContext) -> dict[str, object]:
    """The file metadata naming the checkpoint a window was mined on, where the window names one (under checkpoint
    rotation, mining/rotation.py, it changes from window to window; otherwise the run's extra metadata says it)."""
    if not window.model_name:
        return {}
    return {"checkpoint_window": window.checkpoint_window, "model_name": window.model_name}


@dataclass
class WindowReport:
    """What was written for one window (the per-window summary and the status file's windows record)."""

    window_start: int
    file: str | None  # None: nothing in the prefix, no file written
    partial: bool
    issued_groups: int
    groups: int  # in the file: 0..groups-1
    rollouts: int  # in the file
    cut_groups: int  # generated (or being generated) but not in the file: after a gap, or not there at the cut
    cut_rollouts: int
    failed_indices: list[int]  # dropped MAX_DRAWS times or never redrawn: the file ends before the first
    redraws: int
    missing_groups: list[int]  # issued, not arrived when the file was written
    gaps: list[dict]  # each missing or failed index, in order: why, who held it, the stored rollouts it cut
    completion_tokens: int  # of the rollouts in the file
    solved: int  # answers that satisfy the formula, EOS stripped (what a person calls success)
    validator_success: int  # the validator's `success` flag (scored text includes the trailing EOS)
    reward_sum: float
    seconds: float  # from the window's first issued problem to the last group in the file
    deadline: float | None  # unix time; the validator ignores a file modified later
    ready_at: float  # unix time the file was in place
    write_seconds: float
    file_bytes: int
    trigger: str  # "complete", "cut" or the stop's reason
    checkpoint_window: int | None = None  # the checkpoint the window was mined on (the file's metadata)

    @property
    def margin_s(self) -> float | None:
        """Seconds the file was ready before the deadline (negative: late)."""
        return None if self.deadline is None else self.deadline - self.ready_at

    @property
    def on_time(self) -> bool:
        return self.deadline is None or self.ready_at <= self.deadline

    @property
    def rollouts_per_s(self) -> float:
        return self.rollouts / self.seconds if self.seconds > 0 else 0.0

    @property
    def success_pct(self) -> float:
        return 100.0 * self.solved / self.rollouts if self.rollouts else 0.0

    @property
    def validator_success_pct(self) -> float:
        return 100.0 * self.validator_success / self.rollouts if self.rollouts else 0.0

    @property
    def mean_reward(self) -> float:
        return self.reward_sum / self.rollouts if self.rollouts else 0.0

    def as_dict(self) -> dict:
        """The status file's window record. Two fields are named there by what they are: `cut_indices` (the
        problem indices issued but not in the file: cut) and `written_at_stop` (the daemon stopped during the
        window); the file's metadata keeps `missing_groups` and `partial`."""
        out = asdict(self)
        out["cut_indices"], out["written_at_stop"] = out.pop("missing_groups"), out.pop("partial")
        margin = self.margin_s
        out.update(rollouts_per_s=round(self.rollouts_per_s, 4), success_pct=round(self.success_pct, 2),
                   validator_success_pct=round(self.validator_success_pct, 2),
                   mean_reward=round(self.mean_reward, 6), on_time=self.on_time,
                   margin_s=None if margin is None else round(margin, 3))
        for key in ("seconds", "ready_at", "deadline"):
            if out[key] is not None:
                out[key] = round(out[key], 3)
        out["write_seconds"] = round(self.write_seconds, 4)
        out["reward_sum"] = round(self.reward_sum, 6)
        return out


@dataclass
class GroupRows:
    """One group's rows and the numbers the report sums over the file's groups (the solo sink keeps them as
    groups arrive; a fleet's leader decodes them from Redis, mining/group_payload.py)."""

    table: pa.Table
    rollouts: int
    completion_tokens: int
    solved: int
    validator_success: int
    reward_sum: float
    arrived: float


@dataclass
class _OpenWindow:
    window: WindowContext
    groups: dict[int, GroupRows] = field(default_factory=dict)  # index -> its rows
    failed: set[int] = field(default_factory=set)  # indices that will not be completed
    draws: dict[int, int] = field(default_factory=dict)  # index -> dropped draws so far
    redraws: int = 0
    rollouts: int = 0  # in `groups`, kept as they arrive (the plan's rate reads it at every group)
    issued: tuple[int, ...] | None = None  # known once the source closes the window
    partial: bool = False
    opened: float | None = None
    file: WindowFileWriter | None = None  # the file, written as the prefix 0..encoded-1 grows (`_encode`)
    encoded: int = 0
    encoding: anyio.Lock = field(default_factory=anyio.Lock)

    def resolved(self, index: int) -> bool:
        return index in self.groups or index in self.failed

    @property
    def complete(self) -> bool:
        return self.issued is not None and all(self.resolved(i) for i in self.issued)


OnWritten = Callable[[WindowReport, list[dict]], Awaitable[None]]
OnLate = Callable[[int, int, int], Awaitable[None]]  # (window start, group index, rollouts) cut after the write
Redraw = Callable[[ProblemTask], bool]


def gap_costs(stored: dict[int, int], missing: dict[int, dict]) -> list[dict]:
    """Each index that is not in the file although a later one was issued (`missing`: index -> what is known
    of it, e.g. its state and owner), lowest first, with the stored rollouts it cut: those after it and before
    the next missing index (the first gap ends the file, so the first one also cost what the later ones did)."""
    order = sorted(missing)
    gaps = []
    for k, index in enumerate(order):
        following = order[k + 1] if k + 1 < len(order) else None
        cost = sum(n for i, n in stored.items() if i > index and (following is None or i < following))
        gaps.append({"index": index, **missing[index], "rollouts_cut_after": cost})
    return gaps


class WindowSink:
    """Collects signed groups per window and writes the hotkey's file when complete, at the cut, or at a stop.

    `put` is the pipeline's GroupSink; `close_window` is the ProblemSource's on_close; `cut` is called
    by the daemon at the plan's cut time. `on_written` (optional) gets each window's report and up to
    `sample_size` of its file's records (`file_sample`, for the self-check). After `finish`, late puts
    are refused with a warning; one the write did not count as cut goes to `on_late`.
    """

    def __init__(self, out_dir: str | Path, hotkey: str, worker: WorkerSlot, window_blocks: int, *,
                 plan: DeadlinePlan | None = None, redraw: Redraw | None = None, extra_metadata: dict | None = None,
                 on_written: OnWritten | None = None, sample_size: int = 0, run_seed: int = 0,
                 on_late: OnLate | None = None, log: Log = logger) -> None:
        self.out_dir = Path(out_dir)
        self.log = log  # this hotkey's lines (mining/hotkey_log.py)
        self.hotkey = hotkey
        self.worker = worker
        self.window_blocks = window_blocks
        self.plan = plan
        self.redraw = redraw
        self.extra_metadata = dict(extra_metadata or {})
        self.on_written = on_written
        self.sample_size = sample_size
        self.run_seed = run_seed
        self.reports: list[WindowReport] = []
        self.groups_sunk = 0
        self.on_late = on_late
        self._counted_missing: dict[int, set[int]] = {}  # window start -> in flight at the write, counted cut
        self._open: dict[int, _OpenWindow] = {}
        self._written: set[int] = set()
        self._lock = anyio.Lock()
        self._finished = False

    def path_for(self, window_start: int) -> Path:
        return self.out_dir / PROFILE.window_file_name(self.hotkey, window_start)

    def pending(self) -> dict[int, tuple[int, int | None]]:
        """Open windows: window start -> (groups resolved, groups issued or None while still issuing)."""
        return {ws: (len(w.groups) + len(w.failed), None if w.issued is None else len(w.issued))
                for ws, w in self._open.items()}

    def _window(self, window: WindowContext) -> _OpenWindow:
        state = self._open.get(window.window_start)
        if state is None:
            state = self._open[window.window_start] = _OpenWindow(window)
        return state

    async def put(self, group: SignedGroup) -> None:
        task = group.task
        start = task.window.window_start
        if self.plan is not None:
            self.plan.finished(task.key)
        if self._finished or start in self._written:
            await self._late(group)
            return
        table = await anyio.to_thread.run_sync(records_table, group.records) if group.records else None
        if self._finished or start in self._written:  # written while the rows were being converted
            await self._late(group)
            return
        state = self._window(task.window)
        if state.resolved(task.index):
            raise RuntimeError(f"group {task.index} of window {start} arrived twice")
        now = time.time()
        if state.opened is None:
            state.opened = now
        self.groups_sunk += 1
        self.log.debug("sunk window=%d group=%d rollouts=%d%s", start, task.index, group.rollouts,
                       " dropped" if group.dropped else "")
        if group.dropped:
            draws = state.draws[task.index] = state.draws.get(task.index, 0) + 1
            again = draws < MAX_DRAWS and self.redraw is not None and self.redraw(task)
            self.log.info("window %d group %d dropped (%s)%s", start, task.index, group.dropped,
                          f": drawing again ({draws + 1} of {MAX_DRAWS})" if again else
                          ": the file ends before it")
            if again:
                state.redraws += 1
            else:
                state.failed.add(task.index)
        else:
            state.groups[task.index] = GroupRows(
                table, group.rollouts, group.completion_tokens, sum(group.solved), sum(group.successes),
                sum(group.rewards), now)
            state.rollouts += group.rollouts
            elapsed = now - state.opened
            if self.plan is not None and elapsed > 0:
                self.plan.rate(state.rollouts / elapsed)
            await self._encode(state)
        if state.complete:
            await self._write(state, "complete")

    async def _encode(self, state: _OpenWindow) -> None:
        """Give the window's file the groups that joined the contiguous prefix (they will be in it whatever comes
        later): its full row groups are encoded now, in a thread, so that the cut only adds the last one and the
        footer (protocol/records.py's WindowFileWriter says what that saves)."""
        async with state.encoding:
            if self._open.get(state.window.window_start) is not state:
                return  # written meanwhile
            tables = []
            while state.encoded + len(tables) in state.groups:
                tables.append(state.groups[state.encoded + len(tables)].table)
            if not tables:
                return
            if state.file is None:
                state.file = WindowFileWriter(self.path_for(state.window.window_start))
            try:
                await anyio.to_thread.run_sync(state.file.append, tables)
            except (OSError, pa.ArrowException) as exc:  # the writer removed its temporary; every group is still here
                self.log.warning("window %d: writing the file as it grows failed (%s): begun again with the next "
                                 "group (every group is still held)", state.window.window_start, exc)
                state.file, state.encoded = None, 0
                return
            state.encoded += len(tables)

    async def _late(self, group: SignedGroup) -> None:
        """A group after its window's file: cut. Counted at the write when it was in flight then (missing);
        else (the window was still issuing at the cut, or the cut found nothing) counted now, by `on_late`."""
        start, index = group.task.window.window_start, group.task.index
        counted = self._counted_missing.get(start, set())
        if index in counted:
            counted.discard(index)
            self.log.warning("group %d of window %d arrived after the window's file was written: cut (counted at the "
                             "write)", index, start)
            return
        if group.dropped:
            self.log.info("dropped group %d of window %d arrived after the window's file was written", index, start)
            return
        self.log.warning("group %d of window %d arrived after the window's file was written: %d rollouts cut",
                         index, start, group.rollouts)
        if self.on_late is not None:
            await self.on_late(start, index, group.rollouts)

    async def close_window(self, close: WindowClose) -> None:
        if close.window_start in self._written:  # the cut came first
            return
        state = self._window(close.window)
        state.issued = close.indices
        state.partial = close.partial
        state.failed.update(close.abandoned)
        state.opened = close.opened if state.opened is None else min(state.opened, close.opened)
        self.log.debug("window %d closed for generation: %d groups issued%s", close.window_start,
                       len(close.indices), " (stopping: partial)" if close.partial else "")
        if state.complete:
            await self._write(state, "complete")

    def written(self, window_start: int) -> bool:
        return window_start in self._written

    async def cut(self, window_start: int) -> WindowReport | None:
        """The plan's cut: write what has arrived; what has not is cut (nothing arrived: no file)."""
        state = self._open.get(window_start)
        if state is None:
            if window_start not in self._written:
                self._written.add(window_start)
                self.log.warning("window %d: no group arrived by the cut: no file", window_start)
            return None
        return await self._write(state, "cut")

    async def finish(self, reason: str) -> list[WindowReport]:
        """Write every window still open, marked partial, and refuse later groups.

        After a clean drain there is none; after a drain timeout or an error, what arrived is kept
        and what did not is listed in the file's metadata. Returns once every write begun, here or by a `cut`
        running alongside (the daemon's cut timer can fire as the run ends), has been handed to `on_written`:
        after `finish` no window is reported, so the daemon can close its self-check queue without losing one.
        """
        self._finished = True
        written = []
        for start in sorted(self._open):
            state = self._open.get(start)
            if state is None:
                continue
            self.log.warning("window %d: writing what arrived as partial (%s)", start, reason)
            state.partial = True
            report = await self._write(state, reason)
            if report is not None:
                written.append(report)
        async with self._lock:  # a write begun elsewhere (the daemon's cut) is written and reported first
            pass
        return written

    async def _write(self, state: _OpenWindow, trigger: str) -> WindowReport | None:
        start = state.window.window_start
        async with self._lock:
            if self._open.get(start) is not state:
                return None  # written meanwhile
            del self._open[start]
            self._written.add(start)
            issued = state.issued if state.issued is not None else tuple(sorted(set(state.groups) | state.failed))
            count = 0
            while count in state.groups:
                count += 1
            in_file = [state.groups[i] for i in range(count)]
            after_gap = [g for i, g in state.groups.items() if i >= count]
            missing = sorted(i for i in issued if not state.resolved(i))
            self._counted_missing[start] = set(missing)
            for old in [w for w in self._counted_missing if w < start - 2 * self.window_blocks]:
                del self._counted_missing[old]
            gaps = gap_costs({i: g.rollouts for i, g in state.groups.items()},
                             {**{i: {"state": "in flight"} for i in missing},
                              **{i: {"state": "failed"} for i in state.failed}})
            contents = WindowContents(
                window=state.window, groups=in_file, issued_groups=len(issued),
                cut_groups=len(after_gap) + len(missing),
                cut_rollouts=sum(g.rollouts for g in after_gap) + PROFILE.rollouts_per_problem * len(missing),
                failed_indices=sorted(state.failed), missing_groups=missing, redraws=state.redraws,
                partial=state.partial, opened=state.opened, gaps=gaps)
            async with state.encoding:  # no group is being given to the file now
                contents.file, contents.encoded = state.file, state.encoded
                report = await write_window(self.path_for(start), self.hotkey, self.window_blocks, contents,
                                            trigger, self.plan, {"worker_id": self.worker.worker_id,
                                                                 "total_workers": self.worker.total_workers,
                                                                 **self.extra_metadata})
            self.reports.append(report)
            if self.on_written is not None:  # under the lock, so that `finish` returns after every report
                await self.on_written(report, await file_sample(contents, self.hotkey, self.sample_size, self.run_seed))
        return report


@dataclass
class WindowContents:
    """What goes into a window's file and its report: groups 0..N−1 in file order, and what was left out."""

    window: WindowContext
    groups: list[GroupRows]
    issued_groups: int
    cut_groups: int
    cut_rollouts: int
    failed_indices: list[int]
    missing_groups: list[int]
    redraws: int
    partial: bool
    opened: float | None  # unix time the window's first problem was issued (None: not known)
    gaps: list[dict] = field(default_factory=list)  # gap_costs: the indices that end the file early
    file: WindowFileWriter | None = None  # the solo sink's file, holding groups 0..encoded-1 already
    encoded: int = 0


async def file_sample(contents: WindowContents, hotkey: str, size: int, run_seed: int) -> list[dict]:
    """Up to `size` of a written file's records, drawn uniformly from its rows (groups 0..N−1, the rows just
    written) and decoded as the validator reads them: the daemon's self-check sample, taken the same way by the solo
    sink and by a fleet's leader (its rows come from Redis), so a window's sample depends only on the file, the run
    seed and the hotkey, whoever wrote it. Drawn at the write from the rows already in memory: no record is kept per
    group as it arrives, and no group cut after a gap can be drawn. Only the drawn rows are decoded (a thread)."""
    rollouts = sum(g.table.num_rows for g in contents.groups)
    if size <= 0 or rollouts == 0:
        return []
    rng = random.Random(f"{run_seed}|{contents.window.window_start}|{hotkey}")
    rows = sorted(rng.sample(range(rollouts), min(size, rollouts)))
    table = pa.concat_tables([g.table for g in contents.groups])  # no copy: the groups' chunks
    return await anyio.to_thread.run_sync(lambda: table_records(table.take(rows)))


async def write_window(path: Path, hotkey: str, window_blocks: int, contents: WindowContents, trigger: str,
                       plan: DeadlinePlan | None, extra_metadata: dict) -> WindowReport:
    """Write the hotkey's window file (atomically) and say what was written: the one writer of the solo sink
    and of a fleet's leader (mining/fleet_leader.py), so both files carry the same metadata.

    `trigger` is "complete", "cut" (the deadline plan's) or the reason of a stop; the plan (when given) names
    the deadline and learns the write time and file size for the next window's cut. No group in the prefix:
    no file (the report's `file` is None), and the report still says what was cut and why.
    """
    c = contents
    start = c.window.window_start
    rollouts = sum(g.rollouts for g in c.groups)
    deadline = plan.times(start).deadline if plan is not None else None
    metadata = {
        "wallet": hotkey,
        "window_start": start,
        "window_length": window_blocks,
        "partial": "true" if c.partial else "false",
        "written": trigger,  # complete, cut (the deadline plan's) or the reason of a stop
        "groups": len(c.groups),
        "issued_groups": c.issued_groups,
        "cut_groups": c.cut_groups,
        "cut_rollouts": c.cut_rollouts,
        "failed_indices": ",".join(map(str, c.failed_indices)),
        "missing_groups": ",".join(map(str, c.missing_groups)),
        "block_hash": c.window.block_hash,
        **({"deadline": round(deadline, 3)} if deadline is not None else {}),
        **extra_metadata,
        **window_checkpoint(c.window),
    }
    t0 = time.perf_counter()
    encoded = 0 if c.file is None else c.file.encoded_rows  # in the file before the write
    if c.groups:  # the rest of the rows and the footer (all of them for a fleet's leader)
        writer = c.file or WindowFileWriter(path)
        await anyio.to_thread.run_sync(writer.finish, metadata, [g.table for g in c.groups[c.encoded:]])
    write_seconds = time.perf_counter() - t0
    ready_at = time.time()
    nbytes = os.path.getsize(path) if c.groups else 0
    if plan is not None:
        plan.wrote(rollouts, write_seconds, nbytes, None if c.file is None else rollouts - encoded)
    opened = c.opened or ready_at
    last = max((g.arrived for g in c.groups), default=opened)
    return WindowReport(
        window_start=start, file=str(path) if c.groups else None, partial=c.partial, issued_groups=c.issued_groups, groups=len(c.groups),
        rollouts=rollouts, cut_groups=c.cut_groups, cut_rollouts=c.cut_rollouts, failed_indices=c.failed_indices,
        redraws=c.redraws, missing_groups=c.missing_groups, gaps=c.gaps,
        completion_tokens=sum(g.completion_tokens for g in c.groups), solved=sum(g.solved for g in c.groups),
        validator_success=sum(g.validator_success for g in c.groups),
        reward_sum=sum(g.reward_sum for g in c.groups), seconds=max(0.0, last - opened), deadline=deadline,
        ready_at=ready_at, write_seconds=write_seconds, file_bytes=nbytes, trigger=trigger,
        checkpoint_window=None if metadata.get("checkpoint_window") is None else int(metadata["checkpoint_window"]),
    )
