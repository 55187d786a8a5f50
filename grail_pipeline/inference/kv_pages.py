"""Which KV pages each slot holds: the host side of the paged cache (kv_cache.py), numpy and lists only.

A group's slots take their prompt's pages at admission (`admit`), and one more page each time a decode step
writes the first position of a page (`grow`). Pages go back when a slot's rollout retires, or when its group is
preempted because a page ran out (fast_engine.py). Every change is returned as (slots, columns, pages)
arrays for the device table (`KVCache.set_pages`); entries a slot does not hold name the scratch page.

The 16 rollouts of a group share their prompt: the pages it fills whole (every position before the prompt's
last token, which the first decode step writes) are held once, by all of them, and counted (`refs`); only the
page the prompt ends in is each slot's own, copied, since each rollout writes its own tokens after the prompt
there. W1's prompts (208–283 tokens, mean 239) fill 3 whole pages: over slot-time a slot then holds 5.77 pages
shared against 8.55 copied (mining/kv_sizing.py's count, 64 problems), a third fewer, and the decode attention's
16 rows of a group read the same prompt pages (the GPU's L2 may serve the repeats).

`grow` runs before every decode step for every occupied slot (512 on the benchmark), so it works on arrays
and loops in Python only over the slots that cross into a new page (one in 64 per step).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from grail_pipeline.inference.kv_cache import PAGE, SCRATCH_PAGE, pages_for


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
        self.refs = np.zeros(pages, dtype=np.int64)  # slots holding each page (a shared prompt page: its group's)
        self.held = np.zeros(slots, dtype=np.int64)  # pages each slot holds, columns 0..held-1 of its row
        self.table = np.full((slots, pages_per_slot), SCRATCH_PAGE, dtype=np.int64)
        self.pages_per_slot = pages_per_slot

    @property
    def available(self) -> int:
        return len(self.free)

    @staticmethod
    def prompt_pages(prompt_tokens: int) -> tuple[int, int]:
        """(shared, own): the pages a prompt of `prompt_tokens` fills whole before its last token, held once for
        the group, and the pages each slot holds alone up to that last token's position."""
        shared = (prompt_tokens - 1) // PAGE
        return shared, pages_for(prompt_tokens) - shared

    def admission_pages(self, group: int, prompt_tokens: int) -> int:
        """Pages `admit` takes for a group of `group` rollouts of one prompt."""
        shared, own = self.prompt_pages(prompt_tokens)
        return shared + group * own

    def admit(self, slots: list[int], prompt_tokens: int) -> PageChanges | None:
        """A group's prompt pages: the shared ones in every slot's row, each slot's own after them (None, with
        nothing changed, when there are not enough free pages)."""
        shared, own = self.prompt_pages(prompt_tokens)
        if self.admission_pages(len(slots), prompt_tokens) > len(self.free):
            return None
        common = [self.free.pop() for _ in range(shared)]
        self.refs[common] += len(slots)
        triples = []
        for slot in slots:
            row = common + [self.free.pop() for _ in range(own)]
            self.refs[row[shared:]] += 1
            self.table[slot, :len(row)] = row
            self.held[slot] = len(row)
            triples.extend((slot, column, page) for column, page in enumerate(row))
        return PageChanges.of(triples)

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
                self.refs[page] = 1
                self.table[slot, column] = page
                triples.append((slot, column, page))
            self.held[slot] = target
        return PageChanges.of(triples)

    def release(self, slots: list[int]) -> PageChanges:
        """Every page of `slots` let go (back to the free pages once no slot holds it); their table rows name the
        scratch page again."""
        triples = []
        for slot in slots:
            held = int(self.held[slot])
            pages = self.table[slot, :held]
            self.refs[pages] -= 1
            self.free.extend(reversed([p for p in pages.tolist() if self.refs[p] == 0]))
            triples.extend((slot, column, SCRATCH_PAGE) for column in range(held))
            self.table[slot, :held] = SCRATCH_PAGE
            self.held[slot] = 0
        return PageChanges.of(triples)
