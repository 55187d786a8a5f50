"""Which KV pages each slot holds: the host side of the paged cache (kv_cache.py), numpy and lists only.

A slot takes pages as its sequence reaches them: the prompt's at admission, one more each time a decode step
writes the first position of a page. Pages go back when the slot's rollout retires, or when its group is
preempted because a page ran out (fast_engine.py). Every change is returned as (slots, columns, pages)
arrays for the device table (`KVCache.set_pages`); entries a slot does not hold name the scratch page.

`grow` runs before every decode step for every occupied slot (512 on the benchmark), so it works on arrays
and loops in Python only over the slots that cross into a new page (one in 64 per step).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from grail_pipeline.inference.kv_cache import PAGE, SCRATCH_PAGE


@dataclass(frozen=True)
class PageChanges:
    """Table entries to set: table[slots[j], columns[j]] = pages[j]."""

    slots: np.ndarray
    columns: np.ndarray
    pages: np.ndarray

    def __len__(self) -> int:
        return len(self.slots)

    @classmethod
    def of(cls, triples: list[tuple[int, int, int]]) -> "PageChanges":
        arr = np.asarray(triples, dtype=np.int64).reshape(-1, 3)
        return cls(arr[:, 0], arr[:, 1], arr[:, 2])


class PagePool:
    """`pages` pages (page 0 the scratch page, the rest handed out) for `slots` slots of up to
    `pages_per_slot` pages each."""

    def __init__(self, pages: int, slots: int, pages_per_slot: int) -> None:
        self.free = list(range(pages - 1, SCRATCH_PAGE, -1))  # a stack: the lowest page is handed out first
        self.held = np.zeros(slots, dtype=np.int64)  # pages each slot holds, columns 0..held-1 of its row
        self.table = np.full((slots, pages_per_slot), SCRATCH_PAGE, dtype=np.int64)
        self.pages_per_slot = pages_per_slot

    @property
    def available(self) -> int:
        return len(self.free)

    def grow(self, slots: np.ndarray, positions: np.ndarray) -> PageChanges | None:
        """Pages for each slot in `slots` up to its position in `positions` (the one the next step writes);
        None, with nothing changed, when there are not enough free pages for all of them."""
        need = np.minimum(positions // PAGE + 1, self.pages_per_slot)
        short = np.flatnonzero(need > self.held[slots])
        if not len(short):
            return PageChanges.of([])
        if int((need[short] - self.held[slots[short]]).sum()) > len(self.free):
            return None
        triples = []
        for slot, target in zip(slots[short].tolist(), need[short].tolist()):
            for column in range(int(self.held[slot]), target):
                page = self.free.pop()
                self.table[slot, column] = page
                triples.append((slot, column, page))
            self.held[slot] = target
        return PageChanges.of(triples)

    def release(self, slots: list[int]) -> PageChanges:
        """Every page of `slots` back to the free pages; their table rows name the scratch page again."""
        triples = []
        for slot in slots:
            held = int(self.held[slot])
            self.free.extend(reversed(self.table[slot, :held].tolist()))
            triples.extend((slot, column, SCRATCH_PAGE) for column in range(held))
            self.table[slot, :held] = SCRATCH_PAGE
            self.held[slot] = 0
        return PageChanges.of(triples)
