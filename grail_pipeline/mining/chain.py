"""The simulated chain the dry-run daemon mines against, and the problem source that follows it.

`WindowClock` stands in for the chain: block = seconds since genesis / block time, windows of 30
blocks, and per-window block-hash and drand stand-ins derived from a run seed, so a run can be
replayed. Problem seeds and proof randomness are then derived exactly as the protocol does
(grail-protocol.md §2): the problem seed from (hotkey, block hash, index), the proof randomness as
sha256((block_hash + drand_randomness).encode()).hexdigest().

`ProblemSource` issues this worker's problem indices of the open window (worker k of T takes k,
k+T, …) while the window is open for generation, i.e. until GRAIL_MINER_SAFETY_BLOCKS blocks before
its end; it then tells the sink how many it issued and waits for the next window. No coordinator:
processes on one or many nodes split the index space by their worker id alone.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field

import anyio

from grail_pipeline.common.errors import UserError
from grail_pipeline.mining.messages import ProblemTask, WindowContext
from grail_pipeline.protocol.profile import PROFILE

logger = logging.getLogger("grail_pipeline")

ENV_WORKER_ID = "GRAIL_WORKER_ID"
ENV_TOTAL_WORKERS = "GRAIL_TOTAL_WORKERS"
ENV_SAFETY_BLOCKS = "GRAIL_MINER_SAFETY_BLOCKS"
ENV_BLOCK_TIME = "GRAIL_BLOCK_TIME"
DEFAULT_SAFETY_BLOCKS = 1

_DOMAIN = "grail-pipeline-sim"


def simulated_block_hash(run_seed: int, window_start: int) -> str:
    """The stand-in for the chain's hash of block `window_start`: 0x-prefixed hex, used verbatim."""
    return "0x" + hashlib.sha256(f"{_DOMAIN}|block|{run_seed}|{window_start}".encode()).hexdigest()


def simulated_drand(run_seed: int, window_start: int) -> str:
    """The stand-in for the drand round the miner fetches for the window (hex randomness)."""
    return hashlib.sha256(f"{_DOMAIN}|drand|{run_seed}|{window_start}".encode()).hexdigest()


def proof_randomness(block_hash: str, drand_randomness: str) -> str:
    """The protocol's combined beacon: sha256((block_hash + drand_randomness).encode()).hexdigest()."""
    return hashlib.sha256((block_hash + drand_randomness).encode()).hexdigest()


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    text = env.get(name, "").strip()
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise UserError(f"{name}={text!r} is not a whole number") from None


@dataclass(frozen=True)
class WorkerSlot:
    """This process's share of every window: problem indices worker_id, worker_id + T, …"""

    worker_id: int = 0
    total_workers: int = 1

    def __post_init__(self) -> None:
        if self.total_workers < 1:
            raise UserError(f"{ENV_TOTAL_WORKERS} must be at least 1, got {self.total_workers}")
        if not 0 <= self.worker_id < self.total_workers:
            raise UserError(f"{ENV_WORKER_ID}={self.worker_id} is out of range: worker ids are 0-based and must "
                            f"be below {ENV_TOTAL_WORKERS}={self.total_workers}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> WorkerSlot:
        return cls(_env_int(env, ENV_WORKER_ID, 0), _env_int(env, ENV_TOTAL_WORKERS, 1))

    def indices(self) -> Iterator[int]:
        return itertools.count(self.worker_id, self.total_workers)

    def owns(self, index: int) -> bool:
        return index % self.total_workers == self.worker_id

    def describe(self) -> str:
        return f"worker {self.worker_id} of {self.total_workers}"


def safety_blocks_from_env(window_blocks: int, env: Mapping[str, str] = os.environ) -> int:
    """GRAIL_MINER_SAFETY_BLOCKS (default 1): blocks before a window's end at which generation stops."""
    blocks = _env_int(env, ENV_SAFETY_BLOCKS, DEFAULT_SAFETY_BLOCKS)
    if not 0 <= blocks < window_blocks:
        raise UserError(f"{ENV_SAFETY_BLOCKS}={blocks} must be at least 0 and below the window's "
                        f"{window_blocks} blocks")
    return blocks


def block_time_from_env(env: Mapping[str, str] = os.environ) -> float:
    """GRAIL_BLOCK_TIME in seconds, default the protocol's 12."""
    text = env.get(ENV_BLOCK_TIME, "").strip()
    if not text:
        return PROFILE.block_time_s
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"{ENV_BLOCK_TIME}={text!r} is not a number of seconds") from None
    if not (value > 0 and math.isfinite(value)):
        raise UserError(f"{ENV_BLOCK_TIME}={text!r} must be a positive number of seconds")
    return value


@dataclass
class WindowClock:
    """Blocks from elapsed time; windows and their chain randomness derived from the run seed."""

    block_time_s: float = PROFILE.block_time_s
    window_blocks: int = PROFILE.window_length_blocks
    safety_blocks: int = DEFAULT_SAFETY_BLOCKS
    run_seed: int = 0
    genesis: float | None = None  # unix time of block 0; None: now
    time_fn: Callable[[], float] = field(default=time.time, repr=False)

    def __post_init__(self) -> None:
        if not self.block_time_s > 0:
            raise UserError(f"block time must be positive, got {self.block_time_s}")
        if self.window_blocks < 1:
            raise UserError(f"a window needs at least one block, got {self.window_blocks}")
        if not 0 <= self.safety_blocks < self.window_blocks:
            raise UserError(f"safety blocks ({self.safety_blocks}) must be at least 0 and below the window's "
                            f"{self.window_blocks} blocks")
        if self.genesis is None:
            self.genesis = self.time_fn()

    @property
    def window_seconds(self) -> float:
        return self.window_blocks * self.block_time_s

    def block(self, now: float | None = None) -> int:
        """The current block (0 before genesis)."""
        elapsed = (self.time_fn() if now is None else now) - self.genesis
        return max(0, math.floor(elapsed / self.block_time_s))

    def time_of_block(self, block: int) -> float:
        """Unix time at which `block` begins."""
        return self.genesis + block * self.block_time_s

    def window_start(self, block: int) -> int:
        return (block // self.window_blocks) * self.window_blocks

    def generation_end(self, window_start: int) -> int:
        """First block at which no new work starts for the window."""
        return window_start + self.window_blocks - self.safety_blocks

    def generation_open(self, window_start: int, block: int | None = None) -> bool:
        block = self.block() if block is None else block
        return window_start <= block < self.generation_end(window_start)

    def next_generation_window(self, block: int | None = None) -> int:
        """The window open for generation at `block`, or else the next one to open."""
        block = self.block() if block is None else block
        start = self.window_start(block)
        return start if self.generation_open(start, block) else start + self.window_blocks

    def context(self, window_start: int) -> WindowContext:
        """What the chain and drand would say about a window (replayable from the run seed)."""
        block_hash = simulated_block_hash(self.run_seed, window_start)
        randomness = proof_randomness(block_hash, simulated_drand(self.run_seed, window_start))
        return WindowContext(window_start=window_start, block_hash=block_hash, randomness=randomness, use_drand=True)

    def describe(self) -> str:
        return (f"{self.window_blocks} blocks × {self.block_time_s:g} s = {self.window_seconds:g} s per window, "
                f"generation stops {self.safety_blocks} block(s) before the end, run seed {self.run_seed}")


@dataclass(frozen=True)
class WindowClose:
    """What the source tells the sink when it stops issuing problems for a window."""

    window: WindowContext
    indices: tuple[int, ...]  # issued, in order
    partial: bool  # the daemon stopped while the window was still open for generation
    opened: float  # unix time the first problem was issued
    closed: float  # unix time issuing stopped

    @property
    def window_start(self) -> int:
        return self.window.window_start


MakeTask = Callable[[WindowContext, int, int], ProblemTask]  # (window, index, block) -> task


class ProblemSource:
    """Issues this worker's problems of each window while the clock says it is open.

    Iterate `tasks()` (the pipeline's task source). `stop()` ends intake at the next problem: the
    window being issued is closed as partial, and the iteration ends, which drains the pipeline.
    `max_windows` ends the iteration after that many windows were closed by the stop rule.
    """

    def __init__(self, clock: WindowClock, worker: WorkerSlot, make_task: MakeTask,
                 on_close: Callable[[WindowClose], Awaitable[None]], max_windows: int | None = None) -> None:
        self.clock = clock
        self.worker = worker
        self.make_task = make_task
        self.on_close = on_close
        self.max_windows = max_windows
        self.windows_closed = 0
        self.current_window: int | None = None
        self.issued_total = 0
        self._stop = anyio.Event()
        self._stop_block: int | None = None

    def stop(self) -> None:
        """End intake; the window open at this moment is closed as partial."""
        if self._stop_block is None:
            self._stop_block = self.clock.block()
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def _sleep_until(self, when: float) -> None:
        """Sleep until unix time `when`, or until stop() is called."""
        delay = when - self.clock.time_fn()
        if delay > 0:
            with anyio.move_on_after(delay):
                await self._stop.wait()

    async def tasks(self) -> AsyncIterator[ProblemTask]:
        clock = self.clock
        while not self.stopping:
            block = clock.block()
            start = clock.next_generation_window(block)
            if start > block:  # between windows: wait for the next one to begin
                await self._sleep_until(clock.time_of_block(start))
                continue
            window = clock.context(start)
            self.current_window = start
            logger.debug("window %d open for generation until block %d (block hash %s)", start,
                         clock.generation_end(start), window.block_hash)
            issued: list[int] = []
            opened = clock.time_fn()
            partial = False
            for index in self.worker.indices():
                if self.stopping:  # possibly noticed late: the source waits while the pipeline is full
                    partial = clock.generation_open(start, self._stop_block)
                    break
                block = clock.block()
                if not clock.generation_open(start, block):
                    break
                issued.append(index)
                self.issued_total += 1
                yield self.make_task(window, index, block)
            if issued:
                await self.on_close(WindowClose(window, tuple(issued), partial, opened, clock.time_fn()))
            if self.stopping:
                return
            self.windows_closed += 1 if issued else 0
            if self.max_windows is not None and self.windows_closed >= self.max_windows:
                return
