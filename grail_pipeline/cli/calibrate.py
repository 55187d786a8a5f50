"""`grail-pipeline calibrate`: the fastest batch size whose peak memory leaves room to load a checkpoint.

Loads the model once, runs the benchmark's measurement (the real pipeline, proofs and signatures
included) at growing batch sizes, and keeps the best rollouts/s among the sizes whose peak fits
total memory − headroom (the guide asks for 10–15 GB for checkpoint loading). The choice and the reason
for every other size are printed and written to calibration.yaml, which `emit-pm2` turns into
GRAIL_GENERATION_BATCH_SIZE per GPU kind.

On the CPU (a rehearsal of the fleet, not a GPU to size) the defaults are small: batch sizes 4 and 16,
one problem each, 32-token completions for dummy models (tools/calibration_sweep.py says why). The
file is tried for writing before the model loads, so an unwritable --calibration is one line, not a
lost sweep.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console

from grail_pipeline.cli.arguments import (
    add_runtime_arguments,
    nonnegative_float,
    parse_batch_sizes,
    positive_int,
    whole_int,
)
from grail_pipeline.cli.progress import rate_progress
from grail_pipeline.common.errors import UserError
from grail_pipeline.inference.model_ref import parse_model_ref
from grail_pipeline.mining.rules import check_writable
from grail_pipeline.tools.calibration_file import load_calibrations, save_entry
from grail_pipeline.tools.calibration_sweep import (
    CPU_LENGTH_PROFILE,
    CPU_PEAK,
    CPU_PROBLEMS,
    CPU_SIZES,
    GPU_PEAK,
    GPU_PEAK_NO_NVML,
    MIN_GAIN,
    MIN_PROBLEMS,
    Row,
    calibration_entry,
    check_budget_flags,
    choose,
    default_sizes,
    memory_budget,
    peak_gb,
    problems_for,
    sweep,
    too_big,
)
from grail_pipeline.tools.memory_report import breakdown_line
from grail_pipeline.tools.tables import narrow_table

DEFAULT_HEADROOM_GB = 12.0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("calibrate", help="find the fastest batch size that fits this GPU; write calibration.yaml",
                              description=__doc__.split("\n\n")[0])
    add_runtime_arguments(p, default_model="Qwen/Qwen2.5-3B-Instruct")
    p.add_argument("--batch-sizes", default=None,
                   help="comma list to measure; default: double from 1 (hf, up to 16) or 16 (fast) until a size "
                        f"runs out of memory, exceeds the budget or adds less than {MIN_GAIN:.0%}% rollouts/s; on "
                        f"the CPU {' and '.join(map(str, CPU_SIZES['hf']))} (hf)")
    p.add_argument("--headroom-gb", type=nonnegative_float, default=DEFAULT_HEADROOM_GB,
                   help="memory kept free for checkpoint loading (the guide asks for 10-15 GB; 0 allowed)")
    p.add_argument("--num-problems", type=positive_int, default=None,
                   help=f"problems per batch size; default enough to fill the batch twice (at least {MIN_PROBLEMS}); "
                        f"{CPU_PROBLEMS} on the CPU")
    p.add_argument("--warmup-problems", type=whole_int, default=1, help="untimed problems before each batch size")
    p.add_argument("--seed", type=whole_int, default=42, help="seed of the calibration's window (problems, randomness)")
    p.add_argument("--calibration", default="calibration.yaml", metavar="PATH",
                   help="file to add this GPU kind's entry to (other GPU kinds' entries are kept)")
    p.set_defaults(func=run)


OUTSIDE_ALLOCATOR_GB = 1.0  # CUDA context, cuBLAS and Triton workspaces: 0.88 GB on the H100 (llama3-1b, 256 slots:
# NVML 20.29 GB for the process against torch's 19.41 GB reserved)


def cap_to_budget(device: str, budget_gb: float) -> None:
    """Cap torch's allocator at the budget minus what lives outside it. Without the cap the caching allocator
    keeps freed blocks and its reserved peak says little: on the H100 capped at 24 GB, 64 slots of the 3B
    preset peaked at 23.89 GB reserved with 12.6 GB of it held but unused, and was rejected for a 22 GB
    budget although it needed far less; with the cap the allocator reuses its blocks first."""
    from grail_pipeline.inference.devices import cap_process_memory
    from grail_pipeline.inference.loading import resolve_device

    cap_process_memory(resolve_device(device), max(0.5, budget_gb - OUTSIDE_ALLOCATOR_GB))


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
    check_budget_flags(args.device, args.memory_gb, args.headroom_gb)  # before torch's seconds of imports
    if Path(args.calibration).exists():
        load_calibrations(args.calibration)  # refuse a corrupt file before a long sweep, not after it
    check_writable(args.calibration, "--calibration")  # and an unwritable one (it is written at the end)
    gpu = _gpu_memory(args.device)
    budget = memory_budget(gpu, args.memory_gb, args.headroom_gb)
    explicit = sorted(set(parse_batch_sizes(args.batch_sizes))) if args.batch_sizes is not None else None
    on_gpu = gpu is not None
    if not on_gpu and args.length_profile is None and parse_model_ref(args.model).is_dummy:
        args.length_profile = CPU_LENGTH_PROFILE
    from grail_pipeline.inference.devices import driver_version
    from grail_pipeline.mining.choices import resolve_choices
    from grail_pipeline.mining.runtime import Runtime
    from grail_pipeline.mining.workload import benchmark_window
    from grail_pipeline.protocol.wallet import load_signer
    from grail_pipeline.tools.measurement import measure_batch_size

    choices = resolve_choices(args, explicit)  # every flag is checked before the wallet and the model
    engine_kind = choices.engine_kind
    if on_gpu:  # torch may never reserve more than the budget: a size that runs without OOM fits by construction
        cap_to_budget(args.device, budget.budget_gb)
    sizes = explicit if explicit is not None else list(default_sizes(engine_kind, on_gpu))
    signer = load_signer(required=False)
    runtime = Runtime.from_choices(choices)
    console = Console(width=None if sys.stdout.isatty() else 150)
    console.print(f"Calibrating {runtime.engine_kind} engine on {budget.gpu_name}: budget {budget.budget_gb:.1f} GB = "
                  f"{budget.total_gb:.1f} GB total ({budget.total_source}) - {budget.headroom_gb:g} GB headroom; "
                  f"model {runtime.loaded.name}, lengths {runtime.lengths.spec}; batch sizes "
                  f"{', '.join(map(str, sizes))}{'' if explicit is not None else ' at most'}")
    window = benchmark_window(args.seed)

    try:
        with rate_progress(console) as progress:
            overall = progress.add_task("calibration", total=len(sizes), rate="batch sizes")

            def measure(size: int) -> Row:
                done = int(progress.tasks[overall].completed)
                progress.update(overall, description=f"calibration: size {done + 1} of {len(sizes)} (batch {size})")
                skip = too_big(runtime, size, budget.budget_gb)
                if skip is not None:  # cannot fit: not worth a model's worth of start-up to find out
                    console.print(f"batch {size}: skipped, {skip.reason}")
                    progress.advance(overall)
                    return skip
                result = measure_batch_size(runtime, signer, size, problems_for(size, args.num_problems, on_gpu),
                                            args.warmup_problems, window, 0, progress)
                progress.advance(overall)
                if result.status == "OOM":
                    console.print(f"batch {size}: does not fit, out of memory "
                                  f"({'the --memory-gb cap' if args.memory_gb else 'the card'}); larger sizes not tried")
                return Row(result, peak_gb(result, on_gpu))

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
    from grail_pipeline.tools.calibration_plot import calibration_png_path, write_calibration_png  # matplotlib

    picture = write_calibration_png(load_calibrations(args.calibration), calibration_png_path(args.calibration))
    console.print(f"CHOSEN: batch size {best.batch_size} -> {best.rate:.2f} rollouts/s, peak {best.peak_gb:.2f} GB "
                  f"(GRAIL_GENERATION_BATCH_SIZE={best.batch_size} for {budget.gpu_name}, engine "
                  f"{runtime.engine_kind}); written to {args.calibration}, the picture to {picture}", style="bold")
    if runtime.engine_kind == "fast":
        console.print("The fast engine's batch size is its decode slots: use it with `emit-pm2 --target dry-run`. "
                      "`grail mine` takes an hf calibration (calibrate --engine hf).", style="dim")
    return 0


def _print_rows(console: Console, rows: list[Row], explicit: list[int] | None, peak_source: str) -> None:
    from grail_pipeline.tools.projection import WindowSpec, on_time

    spec = WindowSpec()
    table = narrow_table("CALIBRATION", ["Batch", "Problems", "Roll/s", "On time\nper window", "Hotkeys\nat cap",
                                         "Tok/s", "Peak\n(GB)", "Verdict"], left=("Verdict",))
    for r in rows:
        res = r.result
        peak = "-" if r.peak_gb is None else f"{r.peak_gb:.2f}"
        cells = ((str(res.problems), f"{r.rate:.2f}", f"~{on_time(spec, res):.0f}",
                  str(spec.hotkeys_at_cap(on_time(spec, res))), f"{res.tokens_per_s:.0f}")
                 if res.ok else (res.status, "-", "-", "-", "-"))
        table.add_row(str(r.batch_size), *cells, peak, f"{r.verdict}: {r.reason}",
                      style="bold green" if r.verdict == "chosen" else None)
    measured = {r.batch_size for r in rows}
    for size in explicit or []:
        if size not in measured:
            table.add_row(str(size), "-", "-", "-", "-", "-", "-", "skipped: a smaller size already ran out of memory "
                                                         "or exceeded the budget")
    console.print(table)
    console.print(f"Peak = {peak_source}. On time per window = what reaches a {spec.describe()} window's file before its "
                  f"deadline at that rate (benchmark's projection explains it); hotkeys at cap = how many hotkeys' "
                  f"caps of {spec.cap} that fills per window (`mine --hotkeys`, one engine).", style="dim")
    for r in rows:
        if r.result.memory:
            console.print(f"memory at batch {r.batch_size}: {breakdown_line(r.result.memory)}", style="dim")
