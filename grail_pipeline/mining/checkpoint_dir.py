"""A directory of checkpoints, as a trainer publishes them: which one a window mines with.

The layout is the protocol's: one folder per checkpoint, each with `metadata.json` (`model_name`, `window`),
`config.json`, the safetensors weights and the tokenizer. A folder is complete when its ready marker
`READY` exists, the file its writer creates last (after fsyncing everything else); a folder without it is
being written and is ignored, whatever else it holds. The marker's modification time is when the
checkpoint became ready.

The checkpoint of a window is the newest (highest metadata `window`) that was ready before the window
opened and names that window or an earlier one: a checkpoint published for window 60 is not used in
window 30 even if it is already there (so `make-checkpoints --windows 0,30,60` rehearses each window on
its own checkpoint). A ready folder whose metadata.json is missing or unreadable is one clear line at
start-up (UserError) and, while mining, a logged warning and skipped (once per folder).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from grail_pipeline.common.errors import UserError
from grail_pipeline.inference.checkpoints import METADATA, checkpoint_metadata, checkpoint_window_of

log = logging.getLogger("grail_pipeline")

READY_MARKER = "READY"


@dataclass(frozen=True)
class Checkpoint:
    """A ready checkpoint folder: where it is, the window and model name its metadata.json states, and when its
    ready marker was written (unix seconds)."""

    path: Path
    window: int
    model_name: str
    ready_at: float


def read_checkpoint(folder: Path) -> Checkpoint:
    """The ready folder's checkpoint; a missing or unreadable metadata.json is a UserError naming the folder."""
    if not (folder / METADATA).exists():
        raise UserError(f"checkpoint {folder} is marked {READY_MARKER} but has no {METADATA}")
    metadata = checkpoint_metadata(folder, required=True)  # a FIFO, not JSON, nested too deep: one line
    if not isinstance(metadata, dict) or not isinstance(metadata.get("model_name"), str) or not metadata["model_name"]:
        raise UserError(f"checkpoint {folder}: {METADATA} must be a JSON object with a 'model_name' string")
    if "window" not in metadata:
        raise UserError(f"checkpoint {folder}: {METADATA} has no 'window'")
    try:
        window = checkpoint_window_of(metadata)
    except UserError as exc:
        raise UserError(f"checkpoint {folder}: {exc}") from None
    return Checkpoint(folder, window, metadata["model_name"], (folder / READY_MARKER).stat().st_mtime)


class CheckpointDir:
    """Scans a checkpoint directory on demand (a window opens once per 6 minutes: nothing to gain from inotify)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser()
        self._bad: set[Path] = set()  # ready folders already reported unreadable

    def check_exists(self) -> None:
        if not self.path.is_dir():
            raise UserError(f"--checkpoint-dir {self.path} is not a directory")

    def ready(self, strict: bool = False) -> list[Checkpoint]:
        """Every ready checkpoint, lowest window first. A ready folder with a bad metadata.json is a UserError when
        `strict` (start-up), else a warning, once, and skipped."""
        found = []
        try:
            folders = sorted(p for p in self.path.iterdir() if p.is_dir() and (p / READY_MARKER).is_file())
        except OSError as exc:
            raise UserError(f"--checkpoint-dir {self.path} cannot be read ({exc.strerror or exc})") from None
        for folder in folders:
            try:
                found.append(read_checkpoint(folder))
            except (UserError, OSError) as exc:
                if strict:
                    raise UserError(str(exc)) from None
                if folder not in self._bad:
                    self._bad.add(folder)
                    log.warning("skipping checkpoint %s: %s", folder, exc)
        return sorted(found, key=lambda c: (c.window, c.ready_at))

    def for_window(self, window_start: int, opened_at: float, strict: bool = False) -> Checkpoint | None:
        """The newest checkpoint ready by `opened_at` (unix seconds) that names `window_start` or an earlier window."""
        usable = [c for c in self.ready(strict) if c.window <= window_start and c.ready_at <= opened_at]
        return usable[-1] if usable else None

    def first(self, window_start: int, now: float) -> Checkpoint:
        """The checkpoint to start with: `for_window` now; none is one clear line (the daemon does not wait for a
        trainer: start it once the first checkpoint is published)."""
        self.check_exists()
        chosen = self.for_window(window_start, now, strict=True)
        if chosen is None:
            ready = self.ready(strict=True)
            later = f" (ready: window(s) {', '.join(str(c.window) for c in ready)}, each used from its own window " \
                    f"on)" if ready else ""
            raise UserError(f"--checkpoint-dir {self.path} has no ready checkpoint for window {window_start} or "
                            f"earlier{later}; a checkpoint is a folder with {METADATA} and the {READY_MARKER} file, "
                            f"written last")
        return chosen
