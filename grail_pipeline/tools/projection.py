"""Scoring-window arithmetic: how many rollouts a rate yields in a window's file on time, and what that is worth.

The guide's own script multiplies by 180 s and its text says 50 blocks; the protocol says 30 blocks of
12 s. Everything here takes the window length from blocks × block time, and says so when printed. A rate
is not a window's worth: the file is due 4 s before the window ends, it must be uploaded before that
(the deadline plan's allowance: its bytes at 100 Mbit/s), and the groups in flight when the miner stops
admitting problems take the pipeline's drain time to finish. `on_time_per_window` takes all three off,
as `mine`'s deadline plan does (mining/deadline.py). `hotkeys_at_cap` is how many hotkeys' caps that fills
(`mine --hotkeys` serves them from one engine, mining/fill.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from grail_pipeline.mining.deadline import FIRST_BYTES_PER_ROLLOUT, UPLOAD_MBIT_S
from grail_pipeline.protocol.profile import PROFILE


@dataclass(frozen=True)
class WindowSpec:
    blocks: int = PROFILE.window_length_blocks
    block_time_s: float = PROFILE.block_time_s
    cap: int = PROFILE.unique_rollouts_cap_per_window
    exponent: float = PROFILE.superlinear_exponent

    @property
    def seconds(self) -> float:
        return self.blocks * self.block_time_s

    def describe(self) -> str:
        return f"{self.blocks} blocks × {self.block_time_s:g} s = {self.seconds:g} s"

    def rollouts_per_window(self, rollouts_per_s: float) -> float:
        return rollouts_per_s * self.seconds

    def on_time_per_window(self, rollouts_per_s: float, in_flight_rollouts: float,
                           bytes_per_rollout: float = FIRST_BYTES_PER_ROLLOUT) -> float:
        """Rollouts that reach the window's file before its deadline at this rate: generation runs from the
        window's start until the groups in flight (`in_flight_rollouts`, the slots and the queue) can still
        drain and the file can still be uploaded at UPLOAD_MBIT_S, i.e. R = rate × (T − slack − drain − R·b/bw)."""
        if rollouts_per_s <= 0:
            return 0.0
        drain = in_flight_rollouts / rollouts_per_s
        usable = self.seconds - PROFILE.upload_deadline_slack_s - drain
        upload_s_per_rollout = bytes_per_rollout * 8 / (UPLOAD_MBIT_S * 1e6)
        return max(0.0, rollouts_per_s * usable / (1 + rollouts_per_s * upload_s_per_rollout))

    def score_factor(self, rollouts_per_window: float) -> float:
        """Weight relative to a miner at the cap: min(1, rollouts / cap) ** 4."""
        return min(1.0, rollouts_per_window / self.cap) ** self.exponent

    def hotkeys_at_cap(self, on_time_rollouts: float) -> int:
        """Hotkeys whose whole cap per window these on-time rollouts fill (mine --hotkeys: one file each, filled
        one after another; rollouts past the last whole cap are spare)."""
        return int(on_time_rollouts // self.cap)

    def cap_rate(self) -> float:
        """Rollouts per second that reach the cap."""
        return self.cap / self.seconds


def on_time(spec: WindowSpec, result, workers: int = 1) -> float:
    """On-time rollouts per window for `workers` workers at a measured row's rate (a `BatchResult`; `on_time_at`)."""
    return on_time_at(spec, result.batch_size, result.rollouts_per_s, workers)


def on_time_at(spec: WindowSpec, batch_size: int, rollouts_per_s: float, workers: int = 1) -> float:
    """On-time rollouts per window for `workers` workers at `rollouts_per_s` each: each drains its own slots and
    generation queue (16 rollouts per queued problem), the file is one upload of all of them."""
    from grail_pipeline.mining.pipeline import PipelineConfig  # the pipeline imports torch; this module must not

    in_flight = batch_size + PipelineConfig().generation_queue * PROFILE.rollouts_per_problem
    return spec.on_time_per_window(rollouts_per_s * workers, in_flight * workers)
