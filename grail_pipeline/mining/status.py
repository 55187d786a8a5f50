"""The daemon's JSON status file: what a health check or the PM2 helper reads.

Rewritten atomically on every state change, every window written and a periodic heartbeat, so a
reader never sees half a file. Kept free of heavy imports (no torch), so a health check can import
`read_status` cheaply.

Fields (names others rely on): worker_id, total_workers, pid, state (starting / mining / draining /
stopped), current_window, windows_written, last_window {window_start, rollouts, rollouts_per_s,
success_pct, file, written_at_stop}, updated (unix time), self_check (the latest window's, with --verify-sample)
and self_checks (the last 12 windows', oldest first: one failure a few windows back is still zeroing the miner,
so the latest alone can hide it). More fields are added alongside; with a target or several
hotkeys (mining/fill.py): target_rollouts, hotkeys (every hotkey this engine mines, in fill order) and
spare_capacity (the latest window's, the engine's: the same in every hotkey's file).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from grail_pipeline.common.atomic import stale_temporaries, write_atomically
from grail_pipeline.common.errors import UserError
from grail_pipeline.common.input_file import parse_json, read_text

logger = logging.getLogger("grail_pipeline")
STATES = ("starting", "mining", "draining", "stopped")
SELF_CHECK_HISTORY = 12  # the protocol's rolling period of windows: a failure within it is still costing the miner
LAST_WINDOW_FIELDS = ("window_start", "rollouts", "rollouts_per_s", "success_pct", "file", "written_at_stop")


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
        self._listeners: list[Callable[[dict[str, Any]], None]] = []

    def listen(self, listener: Callable[[dict[str, Any]], None]) -> None:
        """Call `listener(fields)` after each update, with the fields it changed (the metrics, mining/metrics.py);
        in the updating thread, under the lock, so updates arrive in order. One that fails is dropped, said once:
        the status file and the mining go on."""
        self._listeners.append(listener)

    @property
    def data(self) -> dict[str, Any]:
        with self._lock:
            return json.loads(json.dumps(self._data))

    def update(self, **fields: Any) -> None:
        if "state" in fields and fields["state"] not in STATES:
            raise ValueError(f"unknown daemon state {fields['state']!r}")
        with self._lock:
            self._data.update(fields)
            if "self_check" in fields:
                history = self._data.setdefault("self_checks", [])
                history.append(fields["self_check"])
                del history[:-SELF_CHECK_HISTORY]
            self._data["updated"] = time.time()
            text = json.dumps(self._data, indent=2, sort_keys=True, default=str) + "\n"
            write_atomically(self.path, text.encode())
            for listener in list(self._listeners):
                try:
                    listener(fields)
                except Exception:  # noqa: BLE001 - a listener's bug must not stop the daemon's status
                    logger.exception("status listener %r failed and is dropped", listener)
                    self._listeners.remove(listener)


def read_status(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A daemon's status; a missing or unreadable file is one UserError line."""
    if not Path(path).exists():
        raise UserError(f"status file {path} does not exist (is the daemon running with this --out-dir?)")
    data = parse_json(read_text(path, "status file"), f"status file {path}")
    if not isinstance(data, dict) or data.get("state") not in STATES:
        raise UserError(f"status file {path} is not a grail-pipeline daemon status")
    return data


def status_age(data: dict[str, Any], now: float | None = None) -> float:
    """Seconds since the status was last written."""
    return (time.time() if now is None else now) - float(data.get("updated", 0.0))


def previous_windows(path: str | os.PathLike[str]) -> dict[str, dict]:
    """The `windows` a previous run of this worker recorded (none when its status is missing or unreadable)."""
    try:
        windows = read_status(path).get("windows")
    except UserError:
        return {}
    return windows if isinstance(windows, dict) else {}


def reconciled_windows(out_dir: str | os.PathLike[str], hotkey: str, previous: dict[str, dict]) -> dict[str, dict]:
    """The status's `windows` at start: one record per window file of `hotkey` in `out_dir`, the previous run's
    where it has one, else one read from the file's metadata and modification time. A run killed between a
    file and its status record (SIGKILL) left a file its status did not know, and `verify --status` exited 2."""
    import pyarrow.parquet as pq  # here: a health check imports this module without pyarrow's start-up cost

    windows: dict[str, dict] = {}
    for path in sorted(Path(out_dir).glob(f"{hotkey}-window-*.parquet")):
        try:
            meta = {k.decode(): v.decode() for k, v in (pq.read_schema(path).metadata or {}).items()}
            start = int(meta["window_start"])
            mtime = path.stat().st_mtime
        except (OSError, KeyError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
            logger.warning("%s is not a readable window file (%s): left out of the status", path, exc)
            continue
        record = previous.get(str(start))
        if record is None or Path(str(record.get("file"))).name != path.name:
            deadline = float(meta["deadline"]) if "deadline" in meta else None
            record = {"window_start": start, "file": str(path), "rollouts": int(meta.get("inference_count", 0)),
                      "groups": int(meta.get("groups", 0)), "cut_groups": int(meta.get("cut_groups", 0)),
                      "cut_rollouts": int(meta.get("cut_rollouts", 0)), "partial": meta.get("partial") == "true",
                      "trigger": meta.get("written"), "deadline": deadline, "ready_at": round(mtime, 3),
                      "margin_s": None if deadline is None else round(deadline - mtime, 3),
                      "on_time": deadline is None or mtime <= deadline, "file_bytes": path.stat().st_size,
                      "reconciled": "from the file: its run stopped before recording it"}
            logger.warning("window %d: %s was not in the status (its run stopped between the file and the record): "
                           "recorded from the file", start, path.name)
        windows[str(start)] = record
    return windows
