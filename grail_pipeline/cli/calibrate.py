"""`grail-pipeline calibrate`: the fastest batch size whose peak memory leaves room to load a checkpoint.

Loads the model once, runs the benchmark's measurement (the real pipeline, proofs and signatures
included) at growing batch sizes, and keeps the best rollouts/s among the sizes whose peak fits
total memory − headroom (the guide asks for 10–15 GB for checkpoint loading). The choice and the reason
for every other size are printed and written to calibration.yaml, which `emit-pm2` turns into
GRAIL_GENERATION_BATCH_SIZE per GPU kind.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import resource
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from grail_pipeline import __version__
from grail_pipeline.cli.benchmark import BatchResult, benchmark_window, measure_batch_size
from grail_pipeline.common.errors import UserError
from grail_pipeline.inference.devices import driver_version
from grail_pipeline.inference.loading import resolve_device
from grail_pipeline.inference.model_ref import parse_model_ref
from grail_pipeline.mining.runtime import (
    Runtime,
    add_runtime_arguments,
    parse_batch_sizes,
    positive_float,
    positive_int,
    preflight,
)
from grail_pipeline.protocol.profile import PROFILE
from grail_pipeline.protocol.wallet import load_signer
from grail_pipeline.tools.calibration_file import CPU_KIND, load_calibrations, save_entry

DEFAULT_HEADROOM_GB = 12.0
MIN_GAIN = 0.02  # a doubling must add 2 % rollouts/s over the best so far, else the sweep stops
MAX_FAST_SLOTS = 4096
MIN_PROBLEMS = 2
GPU_PEAK = "GPU: the larger of torch's reserved peak and NVML's figure for this process"
GPU_PEAK_NO_NVML = "GPU: torch's reserved peak (NVML has no per-process figure here)"
CPU_PEAK = "CPU: the process's resident memory high-water mark (getrusage), not GPU memory"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("calibrate", help="find the fastest batch size that fits this GPU; write calibration.yaml",
                              description=__doc__.split("\n\n")[0])
    add_runtime_arguments(p, default_model="Qwen/Qwen2.5-3B-Instruct")
    p.add_argument("--batch-sizes", default=None,
                   help="comma list to measure; default: double from 1 (hf, up to 16) or 16 (fast) until a size "
                        f"runs out of memory, exceeds the budget or adds less than {MIN_GAIN:.0%} rollouts/s")
    p.add_argument("--headroom-gb", type=positive_float, default=DEFAULT_HEADROOM_GB,
                   help="memory kept free for checkpoint loading (the guide asks for 10-15 GB)")
    p.add_argument("--memory-gb", type=positive_float, default=None,
                   help="total memory to budget from; default the GPU's; required on the CPU")
    p.add_argument("--num-problems", type=positive_int, default=None,
                   help=f"problems per batch size; default enough to fill the batch twice (at least {MIN_PROBLEMS})")
    p.add_argument("--warmup-problems", type=int, default=1, help="untimed problems before each batch size")
    p.add_argument("--seed", type=int, default=42, help="seed of the calibration's window (problems, randomness)")
    p.add_argument("--calibration", default="calibration.yaml", metavar="PATH",
                   help="file to add this GPU kind's entry to (other GPU kinds' entries are kept)")
    p.set_defaults(func=run)


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
                    startup_seconds=round(r.startup_seconds, 3))


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def doubling(start: int, limit: int) -> Iterator[int]:
    size = start
    while size <= limit:
        yield size
        size *= 2


def default_sizes(engine_kind: str) -> Iterator[int]:
    """hf: 1..16 (its generate batch never exceeds one problem's 16 rollouts); fast: 16 slots and up."""
    group = PROFILE.rollouts_per_problem
    return doubling(1, group) if engine_kind == "hf" else doubling(group, MAX_FAST_SLOTS)


def problems_for(batch_size: int, fixed: int | None) -> int:
    """Enough problems to fill the batch twice, so a large batch is not judged on its ramp and tail."""
    if fixed is not None:
        return fixed
    return max(MIN_PROBLEMS, 2 * math.ceil(batch_size / PROFILE.rollouts_per_problem))


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


def choose(rows: list[Row], budget_gb: float) -> Row | None:
    """The fastest row that ran, produced rollouts and fits the budget; every row gets its reason."""
    fits = [r for r in rows if r.result.ok and r.result.rollouts and r.peak_gb is not None and r.peak_gb <= budget_gb]
    best = max(fits, key=lambda r: r.rate, default=None)
    for r in rows:
        r.verdict = "chosen" if r is best else "rejected"
        if r is best:
            r.reason = f"fastest that fits: peak {r.peak_gb:.2f} GB <= budget {budget_gb:.2f} GB"
        elif not r.result.ok:
            r.reason = f"{r.result.status}: ran out of memory; larger sizes not tried"
        elif not r.result.rollouts:
            r.reason = "no rollouts (every group dropped)"
        elif r.peak_gb is None or r.peak_gb > budget_gb:
            peak = "unknown" if r.peak_gb is None else f"{r.peak_gb:.2f} GB"
            r.reason = f"peak {peak} > budget {budget_gb:.2f} GB"
        else:
            r.reason = f"slower: {r.rate:.2f} rollouts/s < {best.rate:.2f} at batch {best.batch_size}"
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


def memory_budget(args: argparse.Namespace) -> Budget:
    """Total memory (the GPU's, or --memory-gb) and what is left after the headroom."""
    device = resolve_device(args.device)
    if device.type == "cuda":
        # device properties need no CUDA context, so the node's other (maybe mining) GPUs are left alone
        props = torch.cuda.get_device_properties(device.index or 0)
        name, total, source = props.name, props.total_memory / 1e9, "device"
    else:
        if args.memory_gb is None:
            raise UserError("on the CPU there is no GPU memory to budget: give --memory-gb (e.g. --memory-gb 32)")
        name, total, source = CPU_KIND, args.memory_gb, "--memory-gb"
    if args.memory_gb is not None:
        total, source = args.memory_gb, "--memory-gb"
    budget = Budget(name, total, source, args.headroom_gb)
    if budget.budget_gb <= 0:
        raise UserError(f"--headroom-gb {args.headroom_gb:g} leaves nothing of {total:.1f} GB total memory")
    return budget


def run(args: argparse.Namespace) -> int:
    if args.warmup_problems < 0:
        raise UserError("--warmup-problems cannot be negative")
    if Path(args.calibration).exists():
        load_calibrations(args.calibration)  # refuse a corrupt file before a long sweep, not after it
    budget = memory_budget(args)
    explicit = sorted(set(parse_batch_sizes(args.batch_sizes))) if args.batch_sizes is not None else None
    preflight(args, explicit)  # every flag is checked before the wallet and the model
    signer = load_signer(required=False)
    runtime = Runtime.from_args(args)
    on_gpu = runtime.loaded.device.type == "cuda"
    console = Console(width=None if sys.stdout.isatty() else 150)
    console.print(f"Calibrating {runtime.engine_kind} engine on {budget.gpu_name}: budget {budget.budget_gb:.1f} GB = "
                  f"{budget.total_gb:.1f} GB total ({budget.total_source}) - {budget.headroom_gb:g} GB headroom; "
                  f"model {runtime.loaded.name}, lengths {runtime.lengths.spec}")
    window = benchmark_window(args.seed)

    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), console=console, transient=True) as progress:
            def measure(size: int) -> Row:
                result = measure_batch_size(runtime, signer, size, problems_for(size, args.num_problems),
                                            args.warmup_problems, window, 0, progress)
                return Row(result, peak_gb(result, on_gpu))

            sizes = explicit if explicit is not None else default_sizes(runtime.engine_kind)
            rows = sweep(measure, sizes, budget.budget_gb, grow=explicit is None)
    finally:
        runtime.close()
    best = choose(rows, budget.budget_gb)
    peak_source = CPU_PEAK if not on_gpu else GPU_PEAK if any(r.result.gpu_process_gb for r in rows) else GPU_PEAK_NO_NVML
    _print_rows(console, rows, explicit, peak_source)
    if best is None:
        console.print(f"No batch size fits {budget.budget_gb:.1f} GB; {args.calibration} left unchanged. Lower "
                      f"--headroom-gb only if checkpoints load in less, or use a smaller model.", style="bold red")
        return 1
    entry = _entry(args, runtime, budget, rows, best, peak_source, explicit)
    save_entry(args.calibration, entry)
    console.print(f"CHOSEN: batch size {best.batch_size} -> {best.rate:.2f} rollouts/s, peak {best.peak_gb:.2f} GB "
                  f"(GRAIL_GENERATION_BATCH_SIZE={best.batch_size} for {budget.gpu_name}, engine "
                  f"{runtime.engine_kind}); written to {args.calibration}", style="bold")
    if runtime.engine_kind == "fast":
        console.print("The fast engine's batch size is its decode slots: use it with `emit-pm2 --target dry-run`. "
                      "`grail mine` takes an hf calibration (calibrate --engine hf).", style="dim")
    return 0


def _print_rows(console: Console, rows: list[Row], explicit: list[int] | None, peak_source: str) -> None:
    table = Table(title="CALIBRATION", title_justify="left")
    for col in ("Batch", "Problems", "Roll/s", "Tok/s", "Peak(GB)", "Verdict"):
        table.add_column(col, justify="right" if col != "Verdict" else "left")
    for r in rows:
        res = r.result
        peak = "-" if r.peak_gb is None else f"{r.peak_gb:.2f}"
        cells = (str(res.problems), f"{r.rate:.2f}", f"{res.tokens_per_s:.0f}") if res.ok else (res.status, "-", "-")
        table.add_row(str(r.batch_size), *cells, peak, f"{r.verdict}: {r.reason}",
                      style="bold green" if r.verdict == "chosen" else None)
    measured = {r.batch_size for r in rows}
    for size in explicit or []:
        if size not in measured:
            table.add_row(str(size), "-", "-", "-", "-", "skipped: a smaller size already ran out of memory "
                                                         "or exceeded the budget")
    console.print(table)
    console.print(f"Peak = {peak_source}.", style="dim")


def _model_for_workers(model: str) -> str:
    """The --model value the dry-run workers get: a local directory made absolute (they run in another cwd)."""
    ref = parse_model_ref(model)
    return os.path.abspath(ref.raw) if ref.kind == "local" else ref.raw


def _entry(args: argparse.Namespace, runtime: Runtime, budget: Budget, rows: list[Row], best: Row,
           peak_source: str, explicit: list[int] | None) -> dict:
    return dict(
        tool_version=__version__,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        host=platform.node(),
        gpu=dict(name=budget.gpu_name, total_memory_gb=round(budget.total_gb, 3), total_source=budget.total_source,
                 driver=driver_version()),
        model=_model_for_workers(args.model),
        model_name=runtime.loaded.name,
        engine=runtime.engine_kind,
        attention=runtime.loaded.attn_implementation,
        dtype=str(runtime.loaded.dtype).removeprefix("torch."),
        memory=dict(headroom_gb=budget.headroom_gb, budget_gb=round(budget.budget_gb, 3), peak=peak_source),
        workload=dict(problems_per_size=args.num_problems or f"max({MIN_PROBLEMS}, two fills of the batch)",
                      warmup_problems=args.warmup_problems, rollouts_per_problem=PROFILE.rollouts_per_problem,
                      max_new_tokens=args.max_new_tokens, max_prompt_tokens=runtime.max_prompt_tokens,
                      length_profile=runtime.lengths.spec, seed=args.seed),
        sweep="listed: " + ",".join(map(str, explicit)) if explicit is not None
        else f"doubling; stops at OOM, over budget, or < {MIN_GAIN:.0%} gain",
        rows=[r.as_dict() for r in rows],
        chosen=dict(batch_size=best.batch_size, rollouts_per_s=round(best.rate, 4), peak_gb=_round(best.peak_gb)),
    )
