"""The worker-process side of signing.SigningPool; it imports only the standard library, on purpose.

A new worker reads its pickled GroupSigner (megabytes: the tokenizer) while the parent is still in
the spawn call, so the sooner it gets there the shorter the parent waits and the shorter the window
in which a stop signal can kill the worker; the signer's own imports (torch, transformers) come after.

The workers ignore SIGINT and SIGTERM: PM2's tree-kill and a terminal's Ctrl-C reach every process
of the tree, and the parent, which drains its in-flight groups through these workers, must not lose
them. Since they ignore SIGTERM, they watch the parent and leave when it is gone.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import threading
from typing import Any

_sign: Any = None  # the GroupSigner, once start() has run


def start(sign: bytes) -> None:
    """The pool's initializer: ignore the stop signals, follow the parent out, load the signer."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, name="parent-watch", daemon=True).start()
    global _sign
    _sign = pickle.loads(sign)


def _exit_with_parent() -> None:
    """A parent that exits hard (a second signal, a drain timeout, SIGKILL) cannot stop its workers."""
    multiprocessing.connection.wait([multiprocessing.parent_process().sentinel])
    os._exit(1)


def started() -> None:
    """Nothing: submitted once per worker so that the pool starts them all at once."""


def sign(group: Any) -> Any:
    """GroupSigner(group) in this worker: a ProvedGroup in, a SignedGroup out."""
    assert _sign is not None, "the worker's initializer did not run"
    return _sign(group)
