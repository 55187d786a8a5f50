"""The simulated chain the dry-run daemon and the benchmark mine against.

`WindowClock` stands in for the chain: block = seconds since genesis / block time, windows of 30
blocks. Per-window block-hash and drand stand-ins are derived from a domain and a key (the daemon's run
seed and window, or the benchmark's seed) by one function, `simulated_window`, so any run can be
replayed. Problem seeds and proof randomness are then derived exactly as the protocol does
(grail-protocol.md §2): the problem seed from (hotkey, block hash, index), the proof randomness as
sha256((block_hash + drand_randomness).encode()).hexdigest().

`WorkerSlot` says which worker of a hotkey's fleet this process is; the environment readers check GRAIL_WORKER_ID, GRAIL_TOTAL_WORKERS, GRAIL_MINER_SAFETY_BLOCKS and
GRAIL_BLOCK_TIME before anything slow starts.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from grail_pipeline.common.errors import UserError
from grail_pipeline.mining.rules import check_safety_blocks, whole_number
from grail_pipeline.protocol.profile import PROFILE

ENV_WORKER_ID = "GRAIL_WORKER_ID"
ENV_TOTAL_WORKERS = "GRAIL_TOTAL_WORKERS"
ENV_SAFETY_BLOCKS = "GRAIL_MINER_SAFETY_BLOCKS"
ENV_BLOCK_TIME = "GRAIL_BLOCK_TIME"
DEFAULT_SAFETY_BLOCKS = 0  # the deadline plan (mining/deadline.py) decides when to stop; this is extra margin

@dataclass
class WindowContext:
    """What the chain would say about a window: its start block, block hash and proof randomness."""

    window_start: int
    block_hash: str  # 0x-prefixed, used verbatim for problem seeds
    randomness: str  # hex, bound into every commit (block hash + drand, hashed)
    use_drand: bool = True
    checkpoint_window: int = 0
    model_name: str = ""  # the checkpoint's metadata.json model_name, where it changes mid-run (mining/rotation.py)



SIMULATED_CHAIN = "grail-pipeline-sim"  # the daemon's chain: key (run seed, window start)
BENCHMARK_CHAIN = "grail-pipeline-benchmark"  # the benchmark's one window: key (seed,)


def stand_in(domain: str, kind: str, *key: object) -> str:
    """sha256("domain|kind|key…") as hex: a replayable stand-in for a value the chain or drand would give."""
    return hashlib.sha256("|".join(map(str, (domain, kind, *key))).encode()).hexdigest()


def proof_randomness(block_hash: str, drand_randomness: str) -> str:
    """The protocol's combined beacon: sha256((block_hash + drand_randomness).encode()).hexdigest()."""
    return hashlib.sha256((block_hash + drand_randomness).encode()).hexdigest()


def simulated_window(domain: str, window_start: int, *key: object) -> WindowContext:
    """What the chain and drand would say about a window: a 0x-prefixed block hash (used verbatim for problem
    seeds), a drand round, and the proof randomness combined from both as the protocol does."""
    block_hash = "0x" + stand_in(domain, "block", *key)
    randomness = proof_randomness(block_hash, stand_in(domain, "drand", *key))
    return WindowContext(window_start=window_start, block_hash=block_hash, randomness=randomness, use_drand=True)


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    text = env.get(name, "").strip()
    return whole_number(text, name) if text else default


@dataclass(frozen=True)
class WorkerSlot:
    """Which worker of a hotkey's fleet this process is (GRAIL_WORKER_ID of GRAIL_TOTAL_WORKERS)."""

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

    def describe(self) -> str:
        return f"worker {self.worker_id} of {self.total_workers}"


def safety_blocks_from_env(window_blocks: int, env: Mapping[str, str] = os.environ) -> int:
    """GRAIL_MINER_SAFETY_BLOCKS (default 0): blocks before a window's end after which no problem starts, on top of
    the deadline plan's own stop (the fork's only stop rule; here an extra margin for the cautious)."""
    return check_safety_blocks(_env_int(env, ENV_SAFETY_BLOCKS, DEFAULT_SAFETY_BLOCKS), window_blocks, ENV_SAFETY_BLOCKS)


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
        check_safety_blocks(self.safety_blocks, self.window_blocks, "safety blocks")
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
        return simulated_window(SIMULATED_CHAIN, window_start, self.run_seed, window_start)

    def describe(self) -> str:
        return (f"{self.window_blocks} blocks × {self.block_time_s:g} s = {self.window_seconds:g} s per window, "
                f"run seed {self.run_seed}" + (f", no problem starts in the last {self.safety_blocks} block(s)"
                                                if self.safety_blocks else ""))
