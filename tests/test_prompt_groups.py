"""The host side of the shared-prompt decode attention (inference/prompt_groups.py): which slots read a prompt's
shared pages together, and where each slot's own reading starts."""

from __future__ import annotations

import numpy as np

from grail_pipeline.inference.kv_cache import PAGE, SCRATCH_PAGE
from grail_pipeline.inference.prompt_groups import EMPTY, PromptGroups


def test_a_group_sharing_pages_gets_an_entry_and_its_slots_start_after_them() -> None:
    groups = PromptGroups(slots=8, max_shared=3)
    groups.admit([5, 1, 6], [11, 12])
    assert groups.dirty
    members, pages, count, start = groups.snapshot()
    assert not groups.dirty
    assert members[0].tolist()[:4] == [5, 1, 6, EMPTY] and (members[1:] == EMPTY).all()
    assert pages[0].tolist() == [11, 12, SCRATCH_PAGE] and count.tolist() == [2, 0, 0, 0]
    assert start.tolist() == [0, 2 * PAGE, 0, 0, 0, 2 * PAGE, 2 * PAGE, 0]


def test_nothing_shared_or_one_slot_needs_no_entry() -> None:
    groups = PromptGroups(slots=8, max_shared=3)
    groups.admit([0, 1, 2], [])  # a prompt inside one page: each slot reads its own
    groups.admit([3], [7])  # one rollout: nobody to share with
    assert not groups.dirty and (groups.start == 0).all() and (groups.members == EMPTY).all()


def test_members_leave_and_the_last_one_reads_alone() -> None:
    groups = PromptGroups(slots=8, max_shared=2)
    groups.admit([0, 1, 2], [4])
    groups.admit([3, 4], [9, 10])
    groups.snapshot()
    groups.release([1])  # a rollout retired: its group reads on without it
    assert groups.dirty and groups.members[0].tolist()[:3] == [0, EMPTY, 2]
    assert groups.start.tolist()[:3] == [PAGE, 0, PAGE]
    groups.release([2, 7])  # one member left (7 was in no group): the entry is dissolved
    assert (groups.members[0] == EMPTY).all() and groups.count[0] == 0 and groups.start[0] == 0
    assert groups.entry_of[0] == EMPTY
    groups.admit([5, 6, 7], [13])  # the freed entry is the next one taken
    assert groups.members[0].tolist()[:3] == [5, 6, 7] and groups.count.tolist() == [1, 2, 0, 0]
    groups.release([3, 4])  # a preempted group: all its slots at once
    assert groups.count.tolist() == [1, 0, 0, 0] and groups.start.tolist() == [0, 0, 0, 0, 0, PAGE, PAGE, PAGE]


def test_half_the_slots_in_pairs_fill_every_entry() -> None:
    """Two members at least per entry: slots // 2 entries always suffice."""
    groups = PromptGroups(slots=8, max_shared=1)
    for first in range(0, 8, 2):
        groups.admit([first, first + 1], [first + 1])
    assert not groups.free and np.array_equal(groups.count, [1, 1, 1, 1])
