"""The daemon's JSON status file: what a health check or the PM2 helper reads.

Rewritten atomically on every state change, every window written and a periodic heartbeat, so a
reader never sees half a file. Kept free of heavy imports (no torch), so a health check can import
`read_status` cheaply.

Fields (names others rely on): worker_id, total_workers, pid, state (starting / mining / draining /
stopped), current_window, windows_written, last_window {window_start, rollouts, rollouts_per_s,
success_pct, file, partial}, updated (unix time). More fields are added alongside; with a target or several
hotkeys (mining/fill.py): target_rollouts, hotkeys (every hotkey this engine mines, in fill order) and
spare_capacity (the latest window's, the engine's: the same in every hotkey's file).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from grail_pipeline.common.atomic import stale_temporaries, write_atomically
from grail_pipeline.common.errors import UserError

STATES = ("starting", "mining", "draining", "stopped")
LAST_WINDOW_FIELDS = ("window_start", "rollouts", "rollouts_per_s", "success_pct", "file", "partial")


def default_status_path(out_dir: str | os.PathLike[str], worker_id: int) -> Path:
    return Path(out_dir) / f"status-worker-{worker_id}.json"


def hotkey_status_path(path: str | os.PathLike[str], hotkey: str) -> Path:
    """One hotkey's status file when one process mines several (mining/hotkeys.py): `<stem>-<hotkey><suffix>`."""
    path = Path(path)
    return path.with_name(f"{path.stem}-{hotkey}{path.suffix}")


def remove_stale_status_temporaries(path: str | os.PathLike[str]) -> list[Path]:
    """Temporaries of this status file that a killed daemon left behind (other workers' are kept)."""
    path = Path(path)
    removed = [p for p in stale_temporaries(path.parent) if p.name.startswith(f".{path.name}.")]
    for p in removed:
        p.unlink(missing_ok=True)
    return removed


class StatusFile:
    """Holds the daemon's status and rewrites the file on each update (thread-safe)."""

    def __init__(self, path: str | os.PathLike[str], worker_id: int, total_workers: int, **fields: Any) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._data: dict[str, Any] = {
            "worker_id": worker_id,
            "total_workers": total_workers,
            "pid": os.getpid(),
            "state": "starting",
            "current_window": None,
            "windows_written": 0,
            "last_window": None,
            "started": time.time(),
            "updated": time.time(),
            **fields,
        }

    @property
    def data(self) -> dict[str, Any]:
        with self._lock:
            return json.loads(json.dumps(self._data))

    def update(self, **fields: Any) -> None:
        if "state" in fields and fields["state"] not in STATES:
            raise ValueError(f"unknown daemon state {fields['state']!r}")
        with self._lock:
            self._data.update(fields)
            self._data["updated"] = time.time()
            text = json.dumps(self._data, indent=2, sort_keys=True, default=str) + "\n"
            write_atomically(self.path, text.encode())


def read_status(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A daemon's status; a missing or unreadable file is one UserError line."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"status file {path} does not exist (is the daemon running with this --out-dir?)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"status file {path} is not readable JSON ({type(exc).__name__})") from None
    if not isinstance(data, dict) or data.get("state") not in STATES:
        raise UserError(f"status file {path} is not a grail-pipeline daemon status")
    return data


def status_age(data: dict[str, Any], now: float | None = None) -> float:
    """Seconds since the status was last written."""
    return (time.time() if now is None else now) - float(data.get("updated", 0.0))
