"""Signed groups that could not reach Redis, kept on local disk until they can.

A signed group is the miner's work; losing it because Redis restarted would be silent damage. When Redis is
away, each group is written as its own file (atomically: whole or absent, so a kill mid-write leaves
nothing that looks like a group) and merged back once Redis answers: every merged file is deleted only
after Redis has the group (stored or already there), so a crash mid-merge repeats a harmless store. The
directory may be shared by the workers of one machine (file names carry a random part) and merged by any
of them, or by a leader reading it directly.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Callable
from pathlib import Path

from grail_pipeline.common.atomic import write_atomically
from grail_pipeline.fleet.results import SignedGroup

MAGIC = b"GRLSPIL1"
HEADER = struct.Struct(">8sqqI")  # magic, window start, index, rollouts; then the payload
SUFFIX = ".group"


def encode(group: SignedGroup) -> bytes:
    return HEADER.pack(MAGIC, group.window_start, group.index, group.rollouts) + group.payload


def decode(data: bytes) -> SignedGroup:
    magic, window_start, index, rollouts = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ValueError("not a spilled group")
    return SignedGroup(window_start, index, rollouts, data[HEADER.size:])


class Spill:
    """A directory of spilled groups: add one, list them, merge them into Redis through a store function."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def add(self, group: SignedGroup) -> Path:
        path = self.directory / f"{group.window_start}-{group.index:07d}-{uuid.uuid4().hex[:8]}{SUFFIX}"
        write_atomically(path, encode(group))
        return path

    def pending(self) -> list[Path]:
        """Spilled group files, oldest window and lowest index first."""
        if not self.directory.is_dir():
            return []
        return sorted(self.directory.glob(f"*{SUFFIX}"))

    def read(self, path: Path) -> SignedGroup:
        return decode(path.read_bytes())

    def merge(self, store: Callable[[SignedGroup], object]) -> int:
        """`store` every spilled group (e.g. `Results.put`), deleting each file after its store returned;
        the first error (Redis away again) stops the merge with the rest still on disk. Returns how many
        this call handed over. Each file is first renamed to a name of this call's own, so two workers
        merging one shared directory never both take a file (a CI run counted 10 handed over for 6 spilled)."""
        merged = 0
        mine = f".{uuid.uuid4().hex[:8]}.merging"
        for path in self.pending():
            taken = path.with_name(path.name + mine)
            try:
                path.rename(taken)
            except FileNotFoundError:  # another process took it
                continue
            try:
                store(self.read(taken))
            except BaseException:
                taken.rename(path)  # still spilled: the next merge retries it
                raise
            taken.unlink(missing_ok=True)
            merged += 1
        return merged
