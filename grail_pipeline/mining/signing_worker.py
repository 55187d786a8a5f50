"""The worker-process side of signing.SigningPool; it imports only the standard library, on purpose.

A new worker reads its pickled GroupSigner (megabytes: the tokenizer) while the parent is still in
the spawn call, so the sooner it gets there the shorter the parent waits and the shorter the window
in which a stop signal can kill the worker; the signer's own imports (torch, transformers) come after.
The workers ignore SIGINT and SIGTERM and follow the parent out (common/worker_process.py says why).
"""

from __future__ import annotations

import pickle
from typing import Any

from grail_pipeline.common.worker_process import shelter

_sign: Any = None  # the GroupSigner, once start() has run


def start(sign: bytes) -> None:
    """The pool's initializer: ignore the stop signals, follow the parent out, load the signer."""
    shelter()
    global _sign
    _sign = pickle.loads(sign)


def started() -> None:
    """Nothing: submitted once per worker so that the pool starts them all at once."""


def sign(group: Any) -> Any:
    """GroupSigner(group) in this worker: a ProvedGroup in, a SignedGroup out."""
    assert _sign is not None, "the worker's initializer did not run"
    return _sign(group)
