"""Scoring-window arithmetic: how many rollouts a rate yields per window and what that is worth.

The guide's own script multiplies by 180 s and its text says 50 blocks; the protocol says 30 blocks of
12 s. Everything here takes the window length from blocks × block time, and says so when printed.
"""

from __future__ import annotations

from dataclasses import dataclass

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

    def score_factor(self, rollouts_per_window: float) -> float:
        """Weight relative to a miner at the cap: min(1, rollouts / cap) ** 4."""
        return min(1.0, rollouts_per_window / self.cap) ** self.exponent

    def cap_rate(self) -> float:
        """Rollouts per second that reach the cap."""
        return self.cap / self.seconds
