"""The fast engine's slot scheduler, pure host state: admission, retirement, the lag, slot reuse and counts."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from grail_pipeline.inference.engine import GroupRequest
from grail_pipeline.inference.scheduler import SlotScheduler

EOS = 9
MAX_NEW = 5


def tokens(slots: int, **by_slot: int) -> np.ndarray:
    """One step's sampled tokens: 1 in every slot, except those named (s0=EOS, ...)."""
    out = np.ones(slots, dtype=np.int64)
    for name, token in by_slot.items():
        out[int(name[1:])] = token
    return out


def test_the_scheduler_is_host_state_only() -> None:
    code = "import sys, grail_pipeline.inference.scheduler; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_admit_takes_the_lowest_free_slots_and_counts_occupancy() -> None:
    scheduler = SlotScheduler(8, MAX_NEW, EOS)
    assert not scheduler.busy and scheduler.free_slots == 8 and scheduler.occupied_slots == 0
    a = scheduler.admit(GroupRequest("a", [1, 2, 3], [2, None, 4]), step=0)
    b = scheduler.admit(GroupRequest("b", [1], [1, 1]), step=0)
    assert a.slots == [0, 1, 2] and b.slots == [3, 4]
    assert scheduler.busy and scheduler.free_slots == 3 and scheduler.occupied_slots == 5
    assert scheduler.limit[:5].tolist() == [2, MAX_NEW, 4, 1, 1]
    assert scheduler.prompt_len[:5].tolist() == [3, 3, 3, 1, 1]


def test_a_group_is_finished_only_when_every_rollout_is() -> None:
    scheduler = SlotScheduler(4, MAX_NEW, EOS)
    group = scheduler.admit(GroupRequest("g", [5, 6], [1, 3]), step=0)
    first = scheduler.retire(np.array([7, 8, 0, 0]), 0)  # slot 0 reaches its target of 1
    assert first.finished == [] and first.freed == [0]
    assert first.tokens == 2 and first.context == (2 + 1) * 2  # prompt of 2 plus one token, twice
    second = scheduler.retire(np.array([0, 11, 0, 0]), 1)
    assert second.finished == [] and second.freed == [] and second.tokens == 1
    third = scheduler.retire(np.array([0, 12, 0, 0]), 2)
    assert third.finished == [group] and third.freed == [1]
    assert group.ordered_completions() == [[7], [8, 11, 12]]
    assert not scheduler.busy and scheduler.free == [0, 1, 2, 3]


def test_rollouts_end_at_eos_or_their_limit() -> None:
    scheduler = SlotScheduler(3, MAX_NEW, EOS)
    # no target: up to EOS or max_new_tokens; a target past max_new_tokens stops at max_new_tokens
    group = scheduler.admit(GroupRequest("g", [1], [None, None, MAX_NEW + 3]), step=0)
    ended: dict[int, int] = {}
    for step in range(MAX_NEW):
        retired = scheduler.retire(tokens(3, s0=EOS) if step == 2 else tokens(3), step)
        ended.update({slot: step for slot in retired.freed})
    assert ended == {0: 2, 1: MAX_NEW - 1, 2: MAX_NEW - 1}
    assert group.ordered_completions() == [[1, 1, EOS], [1] * MAX_NEW, [1] * MAX_NEW]


def test_tokens_of_steps_before_admission_are_not_the_new_occupants() -> None:
    """With the lag, steps launched before a group was admitted are read after it: their tokens are not its own."""
    scheduler = SlotScheduler(2, MAX_NEW, EOS)
    group = scheduler.admit(GroupRequest("late", [1], [2]), step=5)
    for step in (3, 4):  # launched before the admission, read after it
        retired = scheduler.retire(tokens(2, s0=EOS), step)
        assert retired.tokens == 0 and retired.freed == [] and scheduler.count[0] == 0
    scheduler.retire(tokens(2, s0=21), 5)
    retired = scheduler.retire(tokens(2, s0=22), 6)
    assert retired.finished == [group] and group.ordered_completions() == [[21, 22]]


def test_freed_slots_are_reused_lowest_first() -> None:
    scheduler = SlotScheduler(6, MAX_NEW, EOS)
    scheduler.admit(GroupRequest("a", [1], [3, 1, 3]), step=0)  # slots 0, 1, 2
    scheduler.admit(GroupRequest("b", [1], [3, 1]), step=0)  # slots 3, 4
    retired = scheduler.retire(tokens(6), 0)
    assert retired.freed == [1, 4] and scheduler.free == [1, 4, 5]
    c = scheduler.admit(GroupRequest("c", [1, 2], [2, 2]), step=1)
    assert c.slots == [1, 4] and scheduler.free == [5]
    assert scheduler.first_step[[1, 4]].tolist() == [1, 1] and scheduler.count[[1, 4]].tolist() == [0, 0]
    retired = scheduler.retire(tokens(6), 1)
    assert retired.tokens == 5 and retired.context == (1 + 2) * 3 + (2 + 1) * 2
