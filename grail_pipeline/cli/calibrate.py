"""`grail-pipeline calibrate`: the fastest batch size whose peak memory leaves room to load a checkpoint.

Loads the model once, runs the benchmark's measurement (the real pipeline, proofs and signatures
included) at growing batch sizes, and keeps the best rollouts/s among the sizes whose peak fits
total memory − headroom (the guide asks for 10–15 GB for checkpoint loading). The choice and the reason
for every other size are printed and written to calibration.yaml, which `emit-pm2` turns into
GRAIL_GENERATION_BATCH_SIZE per GPU kind.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from grail_pipeline.cli.arguments import add_runtime_arguments, parse_batch_sizes, positive_float, positive_int
from grail_pipeline.cli.progress import rate_progress
from grail_pipeline.common.errors import UserError
from grail_pipeline.tools.calibration_file import load_calibrations, save_entry
from grail_pipeline.tools.calibration_sweep import (
    CPU_PEAK,
    GPU_PEAK,
    GPU_PEAK_NO_NVML,
    MIN_GAIN,
    MIN_PROBLEMS,
    Row,
    calibration_entry,
    choose,
    default_sizes,
    memory_budget,
    peak_gb,
    problems_for,
    sweep,
)

DEFAULT_HEADROOM_GB = 12.0


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


def _gpu_memory(device: str) -> tuple[str, float] | None:
    """(name, total GB) of the --device GPU, None on the CPU. Device properties need no CUDA context, so the
    node's other (maybe mining) GPUs are left alone."""
    from grail_pipeline.inference.loading import resolve_device

    resolved = resolve_device(device)
    if resolved.type != "cuda":
        return None
    import torch

    props = torch.cuda.get_device_properties(resolved.index or 0)
    return props.name, props.total_memory / 1e9


def run(args: argparse.Namespace) -> int:
    if args.warmup_problems < 0:
        raise UserError("--warmup-problems cannot be negative")
    if Path(args.calibration).exists():
        load_calibrations(args.calibration)  # refuse a corrupt file before a long sweep, not after it
    budget = memory_budget(_gpu_memory(args.device), args.memory_gb, args.headroom_gb)
    explicit = sorted(set(parse_batch_sizes(args.batch_sizes))) if args.batch_sizes is not None else None
    from grail_pipeline.inference.devices import driver_version
    from grail_pipeline.mining.runtime import Runtime, preflight
    from grail_pipeline.mining.workload import benchmark_window
    from grail_pipeline.protocol.wallet import load_signer
    from grail_pipeline.tools.measurement import measure_batch_size

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
        with rate_progress(console) as progress:
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
    entry = calibration_entry(args, runtime, budget, rows, best, peak_source, explicit, driver_version())
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
