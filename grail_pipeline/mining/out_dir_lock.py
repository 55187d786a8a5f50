"""One solo daemon per hotkey and out dir: a lock held for the process's life.

Two `mine --dry-run` daemons of one wallet on one out dir both ran, wrote the same file names, and the
later write replaced the earlier one (half the signed rollouts gone); each also removed the other's
temporaries at start. The lock is an OS lock (flock, through the `filelock` package) on
`<out-dir>/.{hotkey}.lock`: the kernel releases it when the process ends, however it ends (SIGKILL
included), so a restart never finds a stale lock. Workers of a fleet share one out dir on purpose and are
kept apart by their Redis (only the leader writes a window's file), so they take no such lock.
"""

from __future__ import annotations

from pathlib import Path

from filelock import FileLock, Timeout

from grail_pipeline.common.errors import UserError


def lock_out_dir(out_dir: str | Path, hotkey: str) -> FileLock:
    """Take this hotkey's lock on `out_dir` or refuse in one line; keep the returned lock as long as the daemon
    runs (it is released when the process exits)."""
    path = Path(out_dir) / f".{hotkey}.lock"
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise UserError(f"another mine daemon of hotkey {hotkey} is running on --out-dir {out_dir} (it holds "
                        f"{path}): two would write the same window files; stop it, or give this one another "
                        "--out-dir") from None
    except OSError as exc:
        raise UserError(f"cannot lock {path} ({exc.strerror or exc})") from None
    return lock
