"""The first thing each of our spawned worker processes does: shelter from stop signals, follow the parent out.

PM2's tree-kill and a terminal's Ctrl-C reach every process of the tree, and the parent, which drains
its in-flight work through these workers, must not lose them: so they ignore SIGINT and SIGTERM. Since
they ignore SIGTERM, they watch the parent and leave when it is gone (a second signal, a drain timeout,
SIGKILL). Standard library only, so a new worker gets here before its heavy imports.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
import threading


def shelter() -> None:
    """Ignore SIGINT and SIGTERM, and exit as soon as the parent process is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, name="parent-watch", daemon=True).start()


def _exit_with_parent() -> None:
    multiprocessing.connection.wait([multiprocessing.parent_process().sentinel])
    os._exit(1)
