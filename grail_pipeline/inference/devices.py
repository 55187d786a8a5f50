"""What the GPUs are and how much memory this process really holds on them.

torch's reserved peak counts only its caching allocator; NVML's per-process figure also counts the CUDA
context, cuBLAS workspaces and anything outside torch, which is what an out-of-memory kill sees. NVML is
sampled in a background thread because it has no peak of its own; where it is not available (CPU
machines, some containers) the figure is None.

`cap_process_memory` (`--memory-gb`) makes a big card rehearse a small one: torch's allocator refuses to
reserve past the cap and raises an out-of-memory error as the small card would. The cap covers torch's
allocator only; the CUDA context (about half a gigabyte) comes on top, as it does on the small card.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import torch

from grail_pipeline.common.errors import UserError


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    total_gb: float
    free_gb: float


def load_nvml():
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # no library, no driver, or no permission: NVML is optional
        return None


def describe_gpus() -> list[GpuInfo]:
    """Every visible GPU with its free and total memory."""
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        out.append(GpuInfo(i, torch.cuda.get_device_name(i), total / 1e9, free / 1e9))
    return out


def cap_process_memory(device: torch.device, gb: float) -> float:
    """Cap torch's allocator on `device` at `gb` (before anything allocates); returns the fraction set.

    A cap larger than the card is a user error: it would rehearse nothing.
    """
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    if gb * 1e9 > total:
        raise UserError(f"--memory-gb {gb:g} is more than this GPU has ({total / 1e9:.1f} GB)")
    fraction = gb * 1e9 / total
    torch.cuda.set_per_process_memory_fraction(fraction, index)
    return fraction


def memory_limit_bytes(device: torch.device) -> int | None:
    """What torch may reserve on `device`: the card's memory, or the cap set by `cap_process_memory`
    (None off the GPU)."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    return int(total * torch.cuda.get_per_process_memory_fraction(index))


def driver_version() -> str | None:
    nvml = load_nvml()
    if nvml is None:
        return None
    try:
        version = nvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:
        return None


def process_gpu_memory_gb(nvml, device_index: int) -> float | None:
    """This process's memory on one GPU according to the driver."""
    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(device_index)
        for proc in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid == os.getpid() and proc.usedGpuMemory is not None:
                return proc.usedGpuMemory / 1e9
    except Exception:
        return None
    return None


class PeakGpuMemory:
    """Peak GPU memory over a block: torch reserved, and NVML's per-process figure where available."""

    def __init__(self, device: torch.device, interval_s: float = 0.1) -> None:
        self.device = device
        self.interval_s = interval_s
        self.reserved_gb = 0.0
        self.process_gb: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "PeakGpuMemory":
        if self.device.type != "cuda":
            return self
        torch.cuda.reset_peak_memory_stats(self.device)
        nvml = load_nvml()
        index = self.device.index or 0
        if nvml is not None and process_gpu_memory_gb(nvml, index) is not None:
            self._thread = threading.Thread(target=self._sample, args=(nvml, index), daemon=True)
            self._thread.start()
        return self

    def _sample(self, nvml, index: int) -> None:
        while not self._stop.wait(self.interval_s):
            used = process_gpu_memory_gb(nvml, index)
            if used is not None:
                self.process_gb = max(self.process_gb or 0.0, used)

    def __exit__(self, *exc: object) -> None:
        if self.device.type != "cuda":
            return
        self.reserved_gb = torch.cuda.max_memory_reserved(self.device) / 1e9
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            final = process_gpu_memory_gb(load_nvml(), self.device.index or 0)
            if final is not None:
                self.process_gb = max(self.process_gb or 0.0, final)
