"""The validator's check in a process of its own, on a model loaded the way every validator loads it.

A check that shares the engine's model object shares whatever the engine did to it (fused weight views,
compiled functions) and whatever was built in memory rather than loaded: on an H100 a dummy model built
on the GPU passed our own check at 100 % while the protocol's validator, loading the same weights from a
directory, failed 46 of 96 rollouts (inference/checkpoints.py). So the check runs in a spawned process
that loads the checkpoint with plain `from_pretrained` (bf16 into host memory, then the device: the
protocol's `get_model`) and shares nothing with the miner but the records it is handed.

The process is started once and kept (the model loads once), ignores stop signals and leaves with its
parent (common/worker_process.py). On a GPU it holds a second copy of the weights while it lives.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from grail_pipeline.common.worker_process import shelter

_model: Any = None  # the worker's own model, once _start has run
_failure: str | None = None  # why _start could not load it


class CheckUnavailable(RuntimeError):
    """The check could not run (its process could not load the model, or died): one line says why.

    Not a verdict on the rollouts: the caller reports it and goes on (the daemon keeps mining)."""


class ValidatorProcess:
    """`verify(records)` = proving.validator.verify_sample on a model of the worker's own, loaded from `source`.

    `source` is a checkpoint directory or hub id (LoadedModel.source); `device` as `--device` takes it.
    """

    def __init__(self, source: str, device: str) -> None:
        self.source = source
        self.device = device
        self._executor = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_start, initargs=(source, device))

    def verify(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        """Totals of rollouts, positions and logprobs checked and passed, and the model path the check used."""
        try:
            totals = self._executor.submit(_verify, records).result()
        except BrokenProcessPool:
            raise CheckUnavailable(f"the check process for {self.source} died (out of host memory?)") from None
        return {**totals, "model_path": self.source}

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    def __enter__(self) -> ValidatorProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _start(source: str, device: str) -> None:
    """Load the model (heavy imports here, after the signals are sheltered); a failure is kept for `_verify`
    to report as one line, since an initializer that raises breaks the pool with a traceback on stderr."""
    shelter()
    global _model, _failure
    try:
        from grail_pipeline.inference.loading import load_model

        _model = load_model(source, device).model
    except Exception as exc:  # noqa: BLE001 - any load failure is the same for the caller: no check
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        _failure = f"the check process could not load {source} ({type(exc).__name__}: {reason})"


def _verify(records: list[dict[str, Any]]) -> dict[str, int]:
    from grail_pipeline.proving.validator import verify_sample

    if _failure is not None:
        raise CheckUnavailable(_failure)
    return verify_sample(_model, records)
