"""Which slots read a shared prompt together: the host side of the decode attention's shared-prompt kernel.

A group's rollouts hold the pages their prompt fills whole once (kv_pages.py), and the decode attention can read
those pages once for all of them (decode_attention.SharedPrompts). This keeps, in numpy, one entry per group
that has at least two live members and at least one shared page: its slots, its shared pages, and for each
slot the positions those pages cover (where the slot's own reading starts). A member that retires or is
preempted leaves its entry; an entry left with one member is dissolved, and that member reads all its pages
itself again. At most `slots // 2` groups have two members at once, so there are that many entries.

The engine admits and releases here beside the page pool; `dirty` says the device copy (model_runner.py,
`set_shared_prompts`) needs the arrays again before the next step.
"""

from __future__ import annotations

import numpy as np

from grail_pipeline.inference.kv_cache import PAGE, SCRATCH_PAGE
from grail_pipeline.protocol.profile import PROFILE

EMPTY = -1
MEMBERS = PROFILE.rollouts_per_problem  # places in an entry: a group's rollouts


class PromptGroups:
    """Entries for up to `slots // 2` groups of `slots` slots, each with up to `max_shared` shared pages."""

    def __init__(self, slots: int, max_shared: int) -> None:
        entries = max(1, slots // 2)
        self.members = np.full((entries, MEMBERS), EMPTY, dtype=np.int32)
        self.pages = np.full((entries, max(1, max_shared)), SCRATCH_PAGE, dtype=np.int32)
        self.count = np.zeros(entries, dtype=np.int32)
        self.start = np.zeros(slots, dtype=np.int32)
        self.entry_of = np.full(slots, EMPTY, dtype=np.int64)
        self.free = list(range(entries - 1, -1, -1))  # a stack: the lowest entry first
        self.dirty = False

    def admit(self, slots: list[int], shared_pages: list[int]) -> None:
        """A group just given its prompt's pages: an entry when two or more slots share at least one page."""
        if len(slots) < 2 or not shared_pages:
            return
        entry = self.free.pop()
        self.members[entry, :len(slots)] = slots
        self.pages[entry, :len(shared_pages)] = shared_pages
        self.count[entry] = len(shared_pages)
        self.start[slots] = len(shared_pages) * PAGE
        self.entry_of[slots] = entry
        self.dirty = True

    def release(self, slots: list[int]) -> None:
        """Slots given back: out of their entries, and an entry with one member left dissolved."""
        for slot in slots:
            entry = int(self.entry_of[slot])
            if entry == EMPTY:
                continue
            row = self.members[entry]
            row[row == slot] = EMPTY
            self.start[slot] = 0
            self.entry_of[slot] = EMPTY
            left = row[row != EMPTY]
            if len(left) < 2:
                self.start[left] = 0
                self.entry_of[left] = EMPTY
                row[:] = EMPTY
                self.pages[entry] = SCRATCH_PAGE
                self.count[entry] = 0
                self.free.append(entry)
            self.dirty = True

    def snapshot(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(members, pages, count, start) for the device, and clean until the next change: the arrays themselves,
        which the runner's upload copies before they change again."""
        self.dirty = False
        return self.members, self.pages, self.count, self.start
