"""Files that are either complete or absent: temp name in the same directory, fsync, rename, fsync dir.

Used for window files, the benchmark's JSON, the calibration file and caches, so that a crash or a
kill never leaves a half-written file under the final name. Temp names start with a dot and end in
`.tmp`, so no reader picks them up and a restart can sweep them (`stale_temporaries`).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

TMP_SUFFIX = ".tmp"


def write_atomically(path: str | os.PathLike[str], write: Callable[[BinaryIO], None] | bytes) -> None:
    """Write `path` through `write(handle)` (or the given bytes) so that it appears whole or not at all."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}")
    try:
        with open(tmp, "wb") as fh:
            if isinstance(write, bytes):
                fh.write(write)
            else:
                write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None:  # a write's error names no file: name the one meant
            exc.filename = str(final)
        raise
    directory = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


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
