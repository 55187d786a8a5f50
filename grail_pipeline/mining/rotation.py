"""Checkpoint rotation: before each window opens, the daemon moves to that window's checkpoint, without a restart.

The trainer publishes a checkpoint per window (mining/checkpoint_dir.py: which one a window uses). When a
window opens, `before_window` picks its checkpoint; if it is not the loaded one it waits until no group of
the previous window is on the GPU side (Pipeline.idle: queued for generation, generating, or proving), then
copies the new weights into the loaded model's tensors (inference/weights.py: the engine's own storage, so
no recompilation and the CUDA graphs stay valid, tensor by tensor from host memory, so no second copy on
the GPU), and only then lets the window's first problem be issued. Groups of the previous window already
past the GPU (signing, the sink) are not touched: their proofs were made on their own checkpoint.

A checkpoint of another architecture (another config, other tensor shapes) cannot be copied in: the source
ends its iteration before the window's first problem, the pipeline drains, and the daemon builds a new
runtime and engine on the new checkpoint (`restart`), logged, then opens the window. A copy that fails half-way
(a file cut short) puts the previous checkpoint back, skips the bad one for good, and mines on.

The window's rollouts name its checkpoint (`checkpoint_window`, and the commit's model name is the new
metadata.json `model_name`); `source_of(window)` says which checkpoint a window was mined on, so that its
self-check loads that one.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import torch

from grail_pipeline.inference.weights import WeightsMismatch, copy_checkpoint_weights
from grail_pipeline.mining.chain import WindowContext
from grail_pipeline.mining.checkpoint_dir import Checkpoint, CheckpointDir

if TYPE_CHECKING:  # the daemon's parts; the rotation only hands them on
    from grail_pipeline.inference.engine import Engine
    from grail_pipeline.inference.loading import LoadedModel
    from grail_pipeline.mining.pipeline import GpuIdle
    from grail_pipeline.mining.runtime import Runtime

log = logging.getLogger("grail_pipeline")

IDLE_POLL_S = 0.01  # how often the wait for the GPU side to empty looks


@dataclasses.dataclass(frozen=True)
class Switch:
    """One change of checkpoint, for the log and the status file."""

    window_start: int
    checkpoint_window: int
    path: str
    how: str  # "copied" or "restarted"
    wait_idle_s: float  # waiting for the previous window's groups to leave the GPU
    seconds: float  # the copy (or the restart's load and engine start)
    ready_to_mining_s: float  # from the checkpoint's ready marker to the moment its window's problems may start


class CheckpointRotation:
    """The daemon's checkpoint per window. `restart(model)` builds a runtime and engine on a checkpoint folder
    (the command line's choices, another model)."""

    def __init__(self, directory: CheckpointDir, current: Checkpoint,
                 restart: Callable[[str], tuple[Runtime, Engine]]) -> None:
        self.directory = directory
        self.current = current
        self._restart = restart
        self.pending: Checkpoint | None = None  # another architecture: the engine restarts before its window
        self.switches: list[Switch] = []
        self._sources: dict[int, str] = {}  # window start -> the checkpoint folder it was mined on
        self._skip: set[Path] = set()  # checkpoints whose copy failed

    def source_of(self, window_start: int) -> str | None:
        return self._sources.get(window_start)

    def window_context(self, window: WindowContext) -> WindowContext:
        """The window as its rollouts carry it: the current checkpoint's window and model name."""
        self._sources[window.window_start] = str(self.current.path)
        return dataclasses.replace(window, checkpoint_window=self.current.window, model_name=self.current.model_name)

    def choose(self, window_start: int, opened_at: float) -> Checkpoint | None:
        """The window's checkpoint where it is not the loaded one (None: keep the loaded one)."""
        chosen = self.directory.for_window(window_start, opened_at)
        if chosen is None or chosen.path == self.current.path or chosen.path in self._skip:
            return None
        return chosen

    async def before_window(self, window: WindowContext, opened_at: float, loaded: LoadedModel,
                            idle: GpuIdle) -> WindowContext | None:
        """Switch to the window's checkpoint if need be; the window's context, or None when the engine must restart
        first (`pending`)."""
        chosen = self.choose(window.window_start, opened_at)
        if chosen is None:
            return self.window_context(window)
        t0 = time.perf_counter()
        while idle.groups:  # the previous window's last groups are still generating or proving
            await anyio.sleep(IDLE_POLL_S)
        waited = time.perf_counter() - t0
        try:
            report = await anyio.to_thread.run_sync(copy_checkpoint_weights, loaded.model, chosen.path)
        except WeightsMismatch as exc:
            log.warning("window %d: checkpoint %d (%s) cannot be copied into the engine (%s): restarting the engine "
                        "on it", window.window_start, chosen.window, chosen.path, exc)
            self.pending = chosen
            return None
        except Exception as exc:  # noqa: BLE001 - a file cut short or unreadable: the loaded numbers may be half new
            log.error("window %d: copying checkpoint %d (%s) failed (%s: %s); putting checkpoint %d back and skipping "
                      "it from now on", window.window_start, chosen.window, chosen.path, type(exc).__name__, exc,
                      self.current.window)
            self._skip.add(chosen.path)
            await anyio.to_thread.run_sync(copy_checkpoint_weights, loaded.model, self.current.path)
            return self.window_context(window)
        self._adopt(chosen, loaded)
        switch = Switch(window.window_start, chosen.window, str(chosen.path), "copied", round(waited, 3),
                        round(report.seconds, 3), round(time.time() - chosen.ready_at, 3))
        self.switches.append(switch)
        log.info("window %d: checkpoint %d (%s, %s) copied into the engine in %.2f s (%d tensors, %.2f GB; waited "
                 "%.2f s for the GPU side to empty); ready %.1f s ago", window.window_start, chosen.window,
                 chosen.model_name, chosen.path, report.seconds, report.tensors, report.bytes / 1e9, waited,
                 switch.ready_to_mining_s)
        return self.window_context(window)

    def _adopt(self, chosen: Checkpoint, loaded: LoadedModel) -> None:
        """The loaded model now is `chosen`: its name, window and folder (the self-check loads from there)."""
        loaded.name, loaded.checkpoint_window, loaded.source = chosen.model_name, chosen.window, str(chosen.path)
        self.current = chosen

    def restart(self, window_start: int) -> tuple[Runtime, Engine]:
        """A runtime and engine on the pending checkpoint (the caller dropped the old ones: their memory is freed
        first). Blocking: run it in a thread."""
        chosen = self.pending
        assert chosen is not None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        t0 = time.perf_counter()
        runtime, engine = self._restart(str(chosen.path))
        seconds = time.perf_counter() - t0
        self.current, self.pending = chosen, None
        switch = Switch(window_start, chosen.window, str(chosen.path), "restarted", 0.0, round(seconds, 3),
                        round(time.time() - chosen.ready_at, 3))
        self.switches.append(switch)
        log.warning("window %d: engine restarted on checkpoint %d (%s, %s, %s engine) in %.1f s", window_start,
                    chosen.window, chosen.model_name, chosen.path, runtime.engine_kind, seconds)
        return runtime, engine
