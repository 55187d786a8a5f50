"""The calibration sweep: measure growing batch sizes, keep the fastest whose peak memory fits the budget.

The budget is total memory − headroom (the guide asks for 10–15 GB to load a checkpoint). The default
sweep doubles the batch size and stops at an out-of-memory error, at a peak over the budget, or once a
doubling adds less than MIN_GAIN; every size gets a verdict and a reason, and the result becomes one
entry of calibration.yaml (`calibration_file`), which `emit-pm2` turns into each GPU's batch size.
On the CPU (a rehearsal, not a GPU to size) the defaults are small: the GPU defaults ran for more than
14 minutes on a 2-core machine before they were stopped (issue #15); two sizes of one problem each with
32-token completions took 85 s on dummy:tiny there, most of it loading.
Kept free of torch at import (the command's flags read its constants).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import resource
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from grail_pipeline import __version__
from grail_pipeline.common.errors import UserError
from grail_pipeline.inference.model_ref import parse_model_ref
from grail_pipeline.mining.rules import FAST_MAX_SLOTS
from grail_pipeline.protocol.profile import PROFILE
from grail_pipeline.tools.calibration_file import CPU_KIND
from grail_pipeline.tools.projection import WindowSpec, on_time
from grail_pipeline.tools.roofline import result_roofline

if TYPE_CHECKING:
    from grail_pipeline.mining.runtime import Runtime
    from grail_pipeline.tools.measurement import BatchResult

MIN_GAIN = 0.02  # a doubling must add 2 % rollouts/s over the best so far, else the sweep stops
MIN_PROBLEMS = 2
CPU_SIZES = {"hf": (4, 16), "fast": (16, 32)}
CPU_PROBLEMS = 1
CPU_LENGTH_PROFILE = "fixed:32"  # for dummy models on the CPU when --length-profile is not given
GPU_PEAK = "GPU: the larger of torch's reserved peak and NVML's figure for this process"
GPU_PEAK_NO_NVML = "GPU: torch's reserved peak (NVML has no per-process figure here)"
CPU_PEAK = "CPU: the process's resident memory high-water mark (getrusage), not GPU memory"


@dataclass
class Row:
    """One batch size: its measurement, its peak memory and the verdict."""

    result: BatchResult
    peak_gb: float | None = None
    verdict: str = ""
    reason: str = ""

    @property
    def batch_size(self) -> int:
        return self.result.batch_size

    @property
    def rate(self) -> float:
        return self.result.rollouts_per_s

    def as_dict(self) -> dict:
        r = self.result
        return dict(batch_size=r.batch_size, status=r.status, verdict=self.verdict, reason=self.reason,
                    rollouts_per_s=round(r.rollouts_per_s, 4), tokens_per_s=round(r.tokens_per_s, 1),
                    peak_gb=_round(self.peak_gb), gpu_reserved_gb=_round(r.gpu_reserved_gb),
                    gpu_process_gb=_round(r.gpu_process_gb), problems=r.problems, rollouts=r.rollouts,
                    dropped_groups=r.dropped_groups, seconds=round(r.seconds, 3),
                    startup_seconds=round(r.startup_seconds, 3), memory=r.memory)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def doubling(start: int, limit: int) -> Iterator[int]:
    size = start
    while size <= limit:
        yield size
        size *= 2


def default_sizes(engine_kind: str, on_gpu: bool = True) -> Iterator[int]:
    """hf: 1..16 (its generate batch never exceeds one problem's 16 rollouts); fast: 16 slots and up;
    on the CPU two sizes (CPU_SIZES)."""
    if not on_gpu:
        return iter(CPU_SIZES[engine_kind])
    group = PROFILE.rollouts_per_problem
    return doubling(1, group) if engine_kind == "hf" else doubling(group, FAST_MAX_SLOTS)


def problems_for(batch_size: int, fixed: int | None, on_gpu: bool = True) -> int:
    """Enough problems to fill the batch twice, so a large batch is not judged on its ramp and tail
    (on the CPU one: its figures rehearse the fleet, they size no GPU)."""
    if fixed is not None:
        return fixed
    if not on_gpu:
        return CPU_PROBLEMS
    return max(MIN_PROBLEMS, 2 * math.ceil(batch_size / PROFILE.rollouts_per_problem))


SKIPPED = "skipped"


def too_big(runtime: Runtime, batch_size: int, budget_gb: float) -> Row | None:
    """A row for a size whose weights and KV cache alone exceed the budget (not run), else None.

    Both are exact from shapes (inference/kv_cache.py), so the sweep need not build the engine to learn it.
    """
    from grail_pipeline.inference.kv_cache import cache_pages, kv_cache_bytes, positions_per_slot
    from grail_pipeline.inference.memory import GB, module_bytes
    from grail_pipeline.inference.models.decoder import Dims
    from grail_pipeline.tools.measurement import BatchResult

    model = runtime.loaded.model
    weights = module_bytes(model)
    kv = 0
    if runtime.engine_kind == "fast":
        dims = Dims.of(model.config)
        dtype_bytes = runtime.loaded.dtype.itemsize
        pages = cache_pages(model.config, dtype_bytes, batch_size,
                            positions_per_slot(runtime.max_prompt_tokens, runtime.sampling.max_new_tokens),
                            runtime.kv_cache_gb_for(batch_size))
        kv = kv_cache_bytes(model.config.num_hidden_layers, pages, dims.kv_heads, dims.head_dim, dtype_bytes)
    if (weights + kv) / GB <= budget_gb:
        return None
    reason = (f"does not fit: weights {weights / GB:.2f} GB + KV cache {kv / GB:.2f} GB > budget {budget_gb:.2f} GB; "
              f"not run")
    return Row(BatchResult(batch_size=batch_size, status=SKIPPED), None, reason=reason)


def sweep(measure: Callable[[int], Row], sizes: Iterable[int], budget_gb: float, grow: bool) -> list[Row]:
    """Measure sizes in increasing order; stop at an OOM, at a peak over budget, or (when `grow`,
    the default doubling) once a size adds less than MIN_GAIN over the best so far."""
    rows: list[Row] = []
    best: Row | None = None
    for size in sizes:
        row = measure(size)
        rows.append(row)
        if not row.result.ok:
            return rows
        if row.peak_gb is not None and row.peak_gb > budget_gb:
            return rows
        if best is not None and grow and row.rate < best.rate * (1 + MIN_GAIN):
            return rows
        if best is None or row.rate > best.rate:
            best = row
    return rows


def choose(rows: list[Row], budget_gb: float, spec: WindowSpec | None = None) -> Row | None:
    """The row that puts the most rollouts into a window's file on time among those that ran, produced rollouts
    and fit the budget; every row gets its reason.

    Not simply the fastest: the groups in flight when a window's admissions stop must still drain before its
    file is due, and more slots mean more of them (tools/projection.py), so a larger size can be faster and
    still put fewer rollouts on time. The reason says when the two differ."""
    spec = spec or WindowSpec()
    fits = [r for r in rows if r.result.ok and r.result.rollouts and r.peak_gb is not None and r.peak_gb <= budget_gb]
    best = max(fits, key=lambda r: on_time(spec, r.result), default=None)
    fastest = max(fits, key=lambda r: r.rate, default=None)
    for r in rows:
        r.verdict = "chosen" if r is best else "rejected"
        if r is best:
            r.reason = (f"most on time: ~{on_time(spec, r.result):.0f} rollouts per window, peak {r.peak_gb:.2f} GB "
                        f"<= budget {budget_gb:.2f} GB" + ("" if r is fastest else
                                                           f" (batch {fastest.batch_size} is faster, "
                                                           f"{fastest.rate:.2f} rollouts/s, but drains more at the cut)"))
        elif r.result.status == SKIPPED:
            pass  # too_big gave the reason
        elif not r.result.ok:
            r.reason = f"{r.result.status}: does not fit, ran out of memory; larger sizes not tried"
        elif not r.result.rollouts:
            r.reason = "no rollouts (every group dropped)"
        elif r.peak_gb is None or r.peak_gb > budget_gb:
            peak = "unknown" if r.peak_gb is None else f"{r.peak_gb:.2f} GB"
            r.reason = f"peak {peak} > budget {budget_gb:.2f} GB"
        else:
            r.reason = (f"fewer on time: ~{on_time(spec, r.result):.0f} < ~{on_time(spec, best.result):.0f} per window "
                        f"at batch {best.batch_size} ({r.rate:.2f} rollouts/s)")
    return best


def rss_high_water_gb() -> float:
    """The process's peak resident memory so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def peak_gb(result: BatchResult, on_gpu: bool) -> float | None:
    if not result.ok:
        return None
    if on_gpu:
        return max(result.gpu_reserved_gb, result.gpu_process_gb or 0.0)
    return rss_high_water_gb()


@dataclass(frozen=True)
class Budget:
    gpu_name: str
    total_gb: float
    total_source: str
    headroom_gb: float

    @property
    def budget_gb(self) -> float:
        return self.total_gb - self.headroom_gb


def check_budget_flags(device: str, memory_gb: float | None, headroom_gb: float) -> None:
    """What the budget needs, checked from the flags alone, before torch loads (seconds on a small box): the CPU
    needs --memory-gb, and the headroom must leave something of it; each refusal says what would do."""
    if device == "cpu" and memory_gb is None:
        raise UserError("on the CPU there is no GPU memory to budget: give --memory-gb, the memory to budget from, "
                        "with a --headroom-gb below it (e.g. --memory-gb 16 --headroom-gb 2)")
    if memory_gb is not None and memory_gb - headroom_gb <= 0:
        raise UserError(f"--headroom-gb {headroom_gb:g} leaves nothing of --memory-gb {memory_gb:g}: give a smaller "
                        f"--headroom-gb (e.g. --headroom-gb {memory_gb / 4:g}) or a larger --memory-gb")


def memory_budget(gpu: tuple[str, float] | None, memory_gb: float | None, headroom_gb: float) -> Budget:
    """Total memory (the GPU's `(name, total GB)`, or `memory_gb`, which the CPU needs) less the headroom."""
    if gpu is not None:
        (name, total), source = gpu, "device"
    else:
        if memory_gb is None:
            raise UserError("on the CPU there is no GPU memory to budget: give --memory-gb (e.g. --memory-gb 32)")
        name, total, source = CPU_KIND, memory_gb, "--memory-gb"
    if memory_gb is not None:
        total, source = memory_gb, "--memory-gb"
    budget = Budget(name, total, source, headroom_gb)
    if budget.budget_gb <= 0:
        raise UserError(f"--headroom-gb {headroom_gb:g} leaves nothing of {total:.1f} GB total memory")
    return budget


def model_for_workers(model: str) -> str:
    """The --model value the dry-run workers get: a local directory made absolute (they run in another cwd)."""
    ref = parse_model_ref(model)
    return os.path.abspath(ref.raw) if ref.kind == "local" else ref.raw


def calibration_entry(args: argparse.Namespace, runtime: Runtime, budget: Budget, rows: list[Row], best: Row,
                      peak_source: str, explicit: list[int] | None, driver: str | None) -> dict:
    """The calibration.yaml entry of one GPU kind and engine: the sweep's rows, the choice and how it was made."""
    return dict(
        tool_version=__version__,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        host=platform.node(),
        gpu=dict(name=budget.gpu_name, total_memory_gb=round(budget.total_gb, 3), total_source=budget.total_source,
                 driver=driver),
        model=model_for_workers(args.model),
        model_name=runtime.loaded.name,
        engine=runtime.engine_kind,
        attention=runtime.loaded.attn_implementation,
        dtype=str(runtime.loaded.dtype).removeprefix("torch."),
        memory=dict(headroom_gb=budget.headroom_gb, budget_gb=round(budget.budget_gb, 3), peak=peak_source),
        workload=dict(problems_per_size=args.num_problems or (f"max({MIN_PROBLEMS}, two fills of the batch)"
                                                              if budget.gpu_name != CPU_KIND else CPU_PROBLEMS),
                      warmup_problems=args.warmup_problems, rollouts_per_problem=PROFILE.rollouts_per_problem,
                      max_new_tokens=args.max_new_tokens, max_prompt_tokens=runtime.max_prompt_tokens,
                      kv_cache_gb=runtime.kv_cache_gb_for(best.batch_size), length_profile=runtime.lengths.spec,
                      seed=args.seed),
        sweep="listed: " + ",".join(map(str, explicit)) if explicit is not None
        else f"doubling; stops at OOM, over budget, or < {MIN_GAIN:.0%} gain",
        rows=[dict(r.as_dict(), roofline=result_roofline(runtime, r.result)) for r in rows],
        chosen=dict(batch_size=best.batch_size, rollouts_per_s=round(best.rate, 4), peak_gb=_round(best.peak_gb)),
    )
