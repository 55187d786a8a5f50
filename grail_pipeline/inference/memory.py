"""Where the GPU memory goes: a breakdown of the peak that adds up, measured where it can be, computed elsewhere.

Issue #15: the README said 256 slots take "about 30 GB" while the H100 peaked at 50.6 GB reserved, and
nothing said where the rest went. Each part of the pipeline that holds memory reports a `Component`:
- "exact": the bytes of tensors it holds (weights, the KV cache, the runner's buffers);
- "measured": the caching allocator's delta over a phase (allocated, or reserved for the graphs' pool),
  on the GPU only;
- "computed": a size from shapes (a workspace bound, the logits of a step), where nothing can be measured
  (the CPU) or the figure is a bound rather than a use.
`DeviceMemory.phase` measures a phase on the GPU and measures nothing elsewhere (`measured` is False).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch

GB = 1e9


@dataclass(frozen=True)
class Component:
    """One part of the memory: its bytes, how they were found (exact, measured, computed) and what it is."""

    name: str
    bytes: int
    how: str
    what: str = ""

    def as_dict(self) -> dict:
        return {**asdict(self), "gb": round(self.bytes / GB, 3)}


@dataclass
class Phase:
    """The allocator's figures over one phase (zeros and `measured` False off the GPU)."""

    name: str
    measured: bool = False
    allocated_before: int = 0
    allocated_after: int = 0
    reserved_before: int = 0
    reserved_after: int = 0
    peak_allocated: int = 0  # the allocator's peak during the phase
    peak_reserved: int = 0

    @property
    def allocated_delta(self) -> int:
        return max(0, self.allocated_after - self.allocated_before)

    @property
    def reserved_delta(self) -> int:
        return max(0, self.reserved_after - self.reserved_before)

    @property
    def transient(self) -> int:
        """What the phase allocated at its peak and gave back by its end (workspace)."""
        return max(0, self.peak_allocated - self.allocated_after)


class DeviceMemory:
    """Phases of one device's memory; `peak_reserved` is the highest reserved figure over all of them.

    A phase resets the allocator's peak statistics at its start, so an enclosing measurement of the peak
    (devices.PeakGpuMemory) must take the larger of its own figure and `peak_reserved`.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.on_gpu = device.type == "cuda"
        self.phases: list[Phase] = []

    @property
    def peak_reserved(self) -> int:
        return max((p.peak_reserved for p in self.phases), default=0)

    @contextmanager
    def phase(self, name: str) -> Iterator[Phase]:
        phase = Phase(name, measured=self.on_gpu)
        self.phases.append(phase)
        if not self.on_gpu:
            yield phase
            return
        torch.cuda.synchronize(self.device)
        phase.allocated_before = torch.cuda.memory_allocated(self.device)
        phase.reserved_before = torch.cuda.memory_reserved(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        try:
            yield phase
        finally:
            torch.cuda.synchronize(self.device)
            phase.allocated_after = torch.cuda.memory_allocated(self.device)
            phase.reserved_after = torch.cuda.memory_reserved(self.device)
            phase.peak_allocated = torch.cuda.max_memory_allocated(self.device)
            phase.peak_reserved = torch.cuda.max_memory_reserved(self.device)


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers, each storage counted once (tied weights, shared views)."""
    seen: set[int] = set()
    total = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def breakdown(components: list[Component], peak_reserved: int | None) -> dict:
    """The report's `memory` entry: every component, their sum, and on the GPU the peak they explain.

    `unattributed` is the peak less the parts that are held through the run (the exact ones and the
    graphs' pool) less the largest workspace: allocator rounding and fragmentation, the pipeline's
    small tensors, whatever no phase saw.
    """
    out: dict = dict(components=[c.as_dict() for c in components])  # some overlap (a bound beside a use): no sum
    if peak_reserved is None:
        out["peak_reserved_gb"] = None
        out["note"] = "no GPU: sizes are exact tensor bytes or computed from shapes; nothing is measured"
        return out
    out["peak_reserved_gb"] = round(peak_reserved / GB, 3)
    held = sum(c.bytes for c in components if c.name in HELD)
    workspace = max((c.bytes for c in components if c.name in WORKSPACES), default=0)
    out["unattributed_gb"] = round((peak_reserved - held - workspace) / GB, 3)
    return out


# the components held for the whole run, and the workspaces that come and go (their largest counts at the peak)
HELD = frozenset({"weights", "kv_cache", "sampler_buffers", "graph_pools", "prover_tables"})
WORKSPACES = frozenset({"run_workspace", "row_count_measurement"})
