"""Files that are either complete or absent: temp name in the same directory, fsync, rename, fsync dir.

Used for window files, the benchmark's JSON, the calibration file and caches, so that a crash or a
kill never leaves a half-written file under the final name. Temp names start with a dot and end in
`.tmp`, so no reader picks them up and a restart can sweep them (`stale_temporaries`).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

TMP_SUFFIX = ".tmp"


class AtomicFile:
    """A file written under a temp name in its final directory and published whole (`publish`: fsync, rename,
    fsync of the directory) or removed (`abort`); for a file written over time (a window file written as its
    rows arrive, protocol/records.py), where `write_atomically`'s one callback does not fit."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.final = Path(path)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.final.with_name(f".{self.final.name}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}")
        self.handle: BinaryIO = open(self.tmp, "w+b")

    def publish(self) -> None:
        try:
            self.handle.flush()
            os.fsync(self.handle.fileno())
            self.handle.close()
            os.replace(self.tmp, self.final)
        except BaseException as exc:
            self.abort()
            name_the_file(exc, self.final)
            raise
        directory = os.open(self.final.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def abort(self) -> None:
        with contextlib.suppress(OSError):  # closing flushes the buffer, which fails again on a full disk: discarded
            self.handle.close()
        self.tmp.unlink(missing_ok=True)


def write_atomically(path: str | os.PathLike[str], write: Callable[[BinaryIO], None] | bytes) -> None:
    """Write `path` through `write(handle)` (or the given bytes) so that it appears whole or not at all."""
    file = AtomicFile(path)
    try:
        if isinstance(write, bytes):
            file.handle.write(write)
        else:
            write(file.handle)
    except BaseException as exc:
        file.abort()
        name_the_file(exc, file.final)
        raise
    file.publish()


def name_the_file(exc: BaseException, final: Path) -> None:
    """A write's error names no file: name the one meant."""
    if isinstance(exc, OSError) and exc.filename is None:
        exc.filename = str(final)


def publish_directory(tmp: str | os.PathLike[str], final: str | os.PathLike[str]) -> None:
    """Move a directory written under a temporary name into place whole: fsync each of its files, then rename
    (checkpoints: a reader that sees the final name sees every file complete)."""
    for file in Path(tmp).iterdir():
        if file.is_file():
            with open(file, "rb") as fh:
                os.fsync(fh.fileno())
    os.replace(tmp, final)


def stale_temporaries(directory: str | os.PathLike[str]) -> list[Path]:
    """Temp files a killed writer left behind in `directory`."""
    folder = Path(directory)
    if not folder.is_dir():
        return []
    return [p for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(TMP_SUFFIX) and p.is_file()]
