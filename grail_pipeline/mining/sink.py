"""The window sink: signed groups in, one atomic Parquet file per window and worker out.

Groups arrive in any order and may arrive after their window ended; each goes to its own window.
A window's file is written once the source has closed the window (it says which indices it issued)
and every issued group has arrived; a dropped group (a completion shorter than the challenge size)
counts as arrived but adds no records. Rows are kept as Arrow tables while the window is open, which
holds a window's rollouts in about a tenth of the memory the record dicts take, and written in
index order with the protocol's schema and metadata: temporary name, fsync, rename. After any stop,
even SIGKILL, a file under the final name is complete; a graceful stop writes what it has, marked
partial in the metadata.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import anyio
import pyarrow as pa

from grail_pipeline.common.atomic import stale_temporaries
from grail_pipeline.mining.chain import WindowContext, WorkerSlot
from grail_pipeline.mining.messages import SignedGroup
from grail_pipeline.mining.source import WindowClose
from grail_pipeline.protocol.records import INFERENCE_SCHEMA, records_table, write_window_table

logger = logging.getLogger("grail_pipeline")


def window_file_name(hotkey: str, window_start: int, worker_id: int) -> str:
    """`{hotkey}-window-{start}-worker-{id}.parquet`: the protocol's name plus the worker id."""
    return f"{hotkey}-window-{window_start}-worker-{worker_id}.parquet"


def remove_stale_temporaries(out_dir: str | Path, hotkey: str, worker_id: int) -> list[Path]:
    """Delete the temporaries a killed run of this worker left in `out_dir`; other workers' are kept.

    A temporary is `.{final name}.{random}.tmp`, so it names its window file and thus its worker.
    """
    suffix = f"-worker-{worker_id}.parquet."
    prefix = f".{hotkey}-window-"
    removed = []
    for path in stale_temporaries(out_dir):
        if path.name.startswith(prefix) and suffix in path.name:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


@dataclass
class WindowReport:
    """What was written for one window (the per-window summary and the status file's last_window)."""

    window_start: int
    worker_id: int
    file: str
    partial: bool
    issued_groups: int
    groups: int  # arrived, dropped included
    dropped_groups: int
    missing_groups: list[int]  # issued but never arrived (only after a drain timeout or an error)
    rollouts: int
    completion_tokens: int
    solved: int  # answers that satisfy the formula, EOS stripped (what a person calls success)
    validator_success: int  # the validator's `success` flag (scored text includes the trailing EOS)
    reward_sum: float
    seconds: float  # from the window's first issued problem to its last group (or the write)
    late_groups: int  # groups that arrived after the window's last block
    write_seconds: float = 0.0

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
        out = asdict(self)
        out.update(rollouts_per_s=round(self.rollouts_per_s, 4), success_pct=round(self.success_pct, 2),
                   validator_success_pct=round(self.validator_success_pct, 2),
                   mean_reward=round(self.mean_reward, 6))
        out["seconds"] = round(self.seconds, 3)
        out["write_seconds"] = round(self.write_seconds, 4)
        out["reward_sum"] = round(self.reward_sum, 6)
        return out


@dataclass
class _OpenWindow:
    window: WindowContext
    tables: dict[int, pa.Table] = field(default_factory=dict)  # group index -> its rows
    arrived: set[int] = field(default_factory=set)
    issued: tuple[int, ...] | None = None  # known once the source closes the window
    partial: bool = False
    opened: float | None = None
    last_arrival: float | None = None
    dropped: int = 0
    rollouts: int = 0
    completion_tokens: int = 0
    solved: int = 0
    validator_success: int = 0
    reward_sum: float = 0.0
    late: int = 0
    sample: list[dict] = field(default_factory=list)
    seen_records: int = 0
    rng: random.Random | None = None

    @property
    def complete(self) -> bool:
        return self.issued is not None and self.arrived >= set(self.issued)


OnWritten = Callable[[WindowReport, list[dict]], Awaitable[None]]


class WindowSink:
    """Collects signed groups per window and writes each window's file when it is complete.

    `put` is the pipeline's GroupSink; `close_window` is the ProblemSource's on_close. `on_written`
    (optional) gets each window's report and up to `sample_size` of its records (a uniform sample,
    for the self-check). After `finish`, late puts are refused with a warning.
    """

    def __init__(self, out_dir: str | Path, hotkey: str, worker: WorkerSlot, window_blocks: int, *,
                 block_time_s: float, genesis: float | None = None, extra_metadata: dict | None = None,
                 on_written: OnWritten | None = None, sample_size: int = 0, run_seed: int = 0) -> None:
        self.out_dir = Path(out_dir)
        self.hotkey = hotkey
        self.worker = worker
        self.window_blocks = window_blocks
        self.block_time_s = block_time_s
        self.genesis = genesis
        self.extra_metadata = dict(extra_metadata or {})
        self.on_written = on_written
        self.sample_size = sample_size
        self.run_seed = run_seed
        self.reports: list[WindowReport] = []
        self.groups_sunk = 0
        self._open: dict[int, _OpenWindow] = {}
        self._lock = anyio.Lock()
        self._finished = False

    def path_for(self, window_start: int) -> Path:
        return self.out_dir / window_file_name(self.hotkey, window_start, self.worker.worker_id)

    def pending(self) -> dict[int, tuple[int, int | None]]:
        """Open windows: window start -> (groups arrived, groups issued or None while still issuing)."""
        return {ws: (len(w.arrived), None if w.issued is None else len(w.issued)) for ws, w in self._open.items()}

    def _window(self, window: WindowContext) -> _OpenWindow:
        state = self._open.get(window.window_start)
        if state is None:
            rng = random.Random(f"{self.run_seed}|{window.window_start}|{self.worker.worker_id}")
            state = self._open[window.window_start] = _OpenWindow(window, rng=rng)
        return state

    async def put(self, group: SignedGroup) -> None:
        task = group.task
        if self._finished:
            logger.warning("group %d of window %d arrived after the sink closed: not written",
                           task.index, task.window.window_start)
            return
        table = await anyio.to_thread.run_sync(records_table, group.records) if group.records else None
        if self._finished:  # finish() ran while the rows were being converted
            logger.warning("group %d of window %d arrived while the sink closed: not written",
                           task.index, task.window.window_start)
            return
        state = self._window(task.window)
        if task.index in state.arrived:
            raise RuntimeError(f"group {task.index} of window {task.window.window_start} arrived twice")
        now = time.time()
        state.arrived.add(task.index)
        state.last_arrival = now
        if state.opened is None:
            state.opened = now
        if self.genesis is not None:
            end = self.genesis + (task.window.window_start + self.window_blocks) * self.block_time_s
            state.late += int(now > end)
        if group.dropped:
            state.dropped += 1
        else:
            state.tables[task.index] = table
            state.rollouts += group.rollouts
            state.solved += sum(group.solved)
            state.validator_success += sum(group.successes)
            state.reward_sum += sum(group.rewards)
            self._sample(state, group.records)
        state.completion_tokens += group.completion_tokens
        self.groups_sunk += 1
        logger.debug("sunk window=%d group=%d rollouts=%d%s", task.window.window_start, task.index,
                     group.rollouts, f" dropped ({group.dropped})" if group.dropped else "")
        if state.complete:
            await self._write(state)

    def _sample(self, state: _OpenWindow, records: list[dict]) -> None:
        """Reservoir sampling, so the self-check sees a uniform sample without keeping every record."""
        if self.sample_size <= 0:
            return
        for record in records:
            state.seen_records += 1
            if len(state.sample) < self.sample_size:
                state.sample.append(record)
            else:
                slot = state.rng.randrange(state.seen_records)
                if slot < self.sample_size:
                    state.sample[slot] = record

    async def close_window(self, close: WindowClose) -> None:
        state = self._window(close.window)
        state.issued = close.indices
        state.partial = close.partial
        state.opened = close.opened if state.opened is None else min(state.opened, close.opened)
        logger.debug("window %d closed for generation: %d groups issued%s", close.window_start,
                     len(close.indices), " (stopping: partial)" if close.partial else "")
        if state.complete:
            await self._write(state)

    async def finish(self, reason: str) -> list[WindowReport]:
        """Write every window still open, marked partial, and refuse later groups.

        After a clean drain there is none; after a drain timeout or an error, what arrived is kept
        and what did not is listed in the file's metadata.
        """
        self._finished = True
        written = []
        for start in sorted(self._open):
            state = self._open.get(start)
            if state is None:
                continue
            missing = sorted(set(state.issued or ()) - state.arrived)
            logger.warning("window %d: writing %d arrived groups as partial (%s)%s", start, len(state.arrived),
                           reason, f"; {len(missing)} issued groups never arrived" if missing else "")
            state.partial = True
            report = await self._write(state)
            if report is not None:
                written.append(report)
        return written

    async def _write(self, state: _OpenWindow) -> WindowReport | None:
        start = state.window.window_start
        async with self._lock:
            if self._open.get(start) is not state:
                return None  # written meanwhile
            del self._open[start]
            issued = state.issued if state.issued is not None else tuple(sorted(state.arrived))
            missing = sorted(set(issued) - state.arrived)
            order = sorted(state.tables)
            table = (pa.concat_tables([state.tables[i] for i in order]) if order
                     else INFERENCE_SCHEMA.empty_table())
            metadata = {
                "wallet": self.hotkey,
                "window_start": start,
                "window_length": self.window_blocks,
                "worker_id": self.worker.worker_id,
                "total_workers": self.worker.total_workers,
                "partial": "true" if state.partial or missing else "false",
                "issued_groups": len(issued),
                "dropped_groups": state.dropped,
                "missing_groups": ",".join(map(str, missing)),
                "block_hash": state.window.block_hash,
                **self.extra_metadata,
            }
            path = self.path_for(start)
            t0 = time.perf_counter()
            await anyio.to_thread.run_sync(write_window_table, path, table, metadata)
            write_seconds = time.perf_counter() - t0
        now = time.time()
        opened = state.opened or now
        report = WindowReport(
            window_start=start, worker_id=self.worker.worker_id, file=str(path),
            partial=metadata["partial"] == "true", issued_groups=len(issued), groups=len(state.arrived),
            dropped_groups=state.dropped, missing_groups=missing, rollouts=state.rollouts,
            completion_tokens=state.completion_tokens, solved=state.solved,
            validator_success=state.validator_success, reward_sum=state.reward_sum,
            seconds=max(0.0, (state.last_arrival or now) - opened), late_groups=state.late,
            write_seconds=write_seconds,
        )
        self.reports.append(report)
        if self.on_written is not None:
            await self.on_written(report, state.sample)
        return report
