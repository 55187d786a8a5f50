"""Several hotkeys from one engine: each hotkey's share of the cap per window, the order they fill in, and what the
engine could make beyond every share.

The validator counts a hotkey's unique rollouts over a rolling period of 12 windows up to UNIQUE_ROLLOUTS_CAP
(61,440 = 5,120 × 12) and weighs them as (U / cap)^4 (grail-protocol.md §6); a window without a file adds nothing
to U. So a hotkey's **target** per window is the cap spread over the windows expected to count:
cap × 12 / (12 − failed), `failed` being the operator's margin for windows that fail (no file, a late one),
rounded up to whole groups of 16. Rollouts past it are generated, proved, signed and uploaded for nothing.

The **fill order** gives the hotkeys their targets one after another (the first listed first): while an earlier
hotkey's source still takes new indices for the open window, a later one holds (ProblemSource's `hold`). The
weight is convex, so when the engine cannot fill every target the shortfall is better on one hotkey than spread
(1 + 0.5⁴ against 2 × 0.75⁴ for 1.5 caps over two hotkeys), and the first files are complete, and written,
early in the window. A source at its target stays open only to redraw a dropped group for the same index.

What the engine could still have made is **spare capacity**, reported per window, never written: the window's
rollouts over the seconds the engine was busy with them, times the seconds from the last group to the cut (a lower
bound where a window holds few groups: its rate includes the first group's whole latency).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from grail_pipeline.common.errors import UserError
from grail_pipeline.protocol.profile import PROFILE, ProtocolProfile

if TYPE_CHECKING:  # kept light: the command line resolves targets before anything heavy is imported
    from grail_pipeline.mining.deadline import WindowTimes
    from grail_pipeline.mining.sink import WindowReport
    from grail_pipeline.mining.source import ProblemSource

KEPT_WINDOWS = 4  # windows waiting for their other hotkeys' files, at most


def groups_for(rollouts: int, profile: ProtocolProfile = PROFILE) -> int:
    """Problems (whole groups) that hold at least `rollouts` rollouts."""
    return math.ceil(rollouts / profile.rollouts_per_problem)


def window_target(failed_windows: int, profile: ProtocolProfile = PROFILE) -> int:
    """Rollouts per window that keep a hotkey's rolling total at the cap when `failed_windows` of every period's
    windows bring nothing, in whole groups."""
    rolling = profile.weight_rolling_windows
    if not 0 <= failed_windows < rolling:
        raise UserError(f"--failed-windows {failed_windows} must be from 0 to {rolling - 1} (of the {rolling} "
                        f"windows the cap is counted over)")
    per_window = math.ceil(profile.unique_rollouts_cap_per_window * rolling / (rolling - failed_windows))
    return groups_for(per_window, profile) * profile.rollouts_per_problem


def check_target(rollouts: int, profile: ProtocolProfile = PROFILE) -> int:
    """A target given in rollouts: whole groups of 16, at least one."""
    if rollouts < profile.rollouts_per_problem or rollouts % profile.rollouts_per_problem:
        raise UserError(f"--target-rollouts {rollouts} must be a whole number of groups of "
                        f"{profile.rollouts_per_problem} rollouts (e.g. {profile.unique_rollouts_cap_per_window})")
    return rollouts


def resolve_target(text: str | None, failed_windows: int, hotkeys: int) -> int | None:
    """`--target-rollouts` (N or 'cap', with `--failed-windows`): 'cap' by default for several hotkeys, none for one
    (it mines as many as the deadline allows, as before targets existed)."""
    if text is None and hotkeys > 1:
        text = "cap"
    if text is None:
        if failed_windows:
            raise UserError("--failed-windows sets the cap's target: add --target-rollouts cap")
        return None
    if text.strip().lower() == "cap":
        return window_target(failed_windows)
    if failed_windows:
        raise UserError("--failed-windows applies to --target-rollouts cap, not to a number of rollouts")
    if not text.strip().isdigit():
        raise UserError(f"--target-rollouts {text!r} must be a number of rollouts or 'cap'")
    return check_target(int(text))


@dataclass(frozen=True)
class SpareCapacity:
    """One window across every hotkey: their targets met or not, and what the engine could have added."""

    window_start: int
    hotkeys: int
    target_rollouts: int
    rollouts: int  # in the hotkeys' files
    short: dict[str, int]  # hotkey -> rollouts in its file, for those below the target
    busy_s: float  # from the window's opening to the start of its last file's write
    rollouts_per_s: float
    spare_s: float  # from then to the cut
    spare_rollouts: int
    more_hotkeys: int  # whole targets in the spare rollouts

    def as_dict(self) -> dict:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in self.__dict__.items()}

    def describe(self) -> str:
        if self.short:
            shortfall = ", ".join(f"{h[:8]}… {r}" for h, r in self.short.items())
            return (f"window {self.window_start}: {self.hotkeys - len(self.short)} of {self.hotkeys} hotkey(s) at "
                    f"their target of {self.target_rollouts} rollouts; short: {shortfall} (no spare capacity)")
        return (f"window {self.window_start}: all {self.hotkeys} hotkey(s) at their target of {self.target_rollouts} "
                f"rollouts ({self.rollouts} in {self.busy_s:.1f} s, {self.rollouts_per_s:.1f} rollouts/s); spare "
                f"capacity {self.spare_s:.1f} s before the cut ≈ {self.spare_rollouts} rollouts ≈ "
                f"{self.more_hotkeys} more hotkey(s) this engine could serve (not generated)")


class FillOrder:
    """The hotkeys' sources in fill order, one target for all; `hold` for ProblemSource, `written` per file."""

    def __init__(self, hotkeys: list[str], target_rollouts: int) -> None:
        self.hotkeys = list(hotkeys)
        self.target_rollouts = target_rollouts
        self.target_groups = groups_for(target_rollouts)
        self._sources: dict[str, ProblemSource] = {}
        self._reports: dict[int, dict[str, WindowReport]] = {}
        self.last: SpareCapacity | None = None  # the latest window whose every file is in

    def join(self, hotkey: str, source: ProblemSource) -> None:
        self._sources[hotkey] = source

    def hold(self, hotkey: str) -> bool:
        """True while a hotkey listed before this one still takes new indices for its open window."""
        for earlier in self.hotkeys[:self.hotkeys.index(hotkey)]:
            source = self._sources.get(earlier)
            if source is not None and source.filling:
                return True
        return False

    def written(self, hotkey: str, report: WindowReport, times: WindowTimes, cut: float) -> SpareCapacity | None:
        """A hotkey's file of a window; once every hotkey's file of that window is in, what the engine could
        still have made in it (`times` and `cut` are the reporting hotkey's plan's)."""
        start = report.window_start
        reports = self._reports.setdefault(start, {})
        reports[hotkey] = report
        for old in sorted(self._reports)[:-KEPT_WINDOWS]:  # a hotkey whose file never came (nothing arrived)
            del self._reports[old]
        if len(reports) < len(self.hotkeys):
            return None
        del self._reports[start]
        rollouts = sum(r.rollouts for r in reports.values())
        short = {h: r.rollouts for h, r in reports.items() if r.rollouts < self.target_rollouts}
        busy_until = max(r.ready_at - r.write_seconds for r in reports.values())
        busy_s = max(1e-9, busy_until - times.opens)
        rate = rollouts / busy_s
        spare_s = 0.0 if short else max(0.0, cut - busy_until)
        spare = int(rate * spare_s)
        self.last = SpareCapacity(start, len(self.hotkeys), self.target_rollouts, rollouts, short, busy_s, rate,
                                  spare_s, spare, spare // self.target_rollouts)
        return self.last
