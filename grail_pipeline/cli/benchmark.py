"""`grail-pipeline benchmark`: rollouts per second on this box, without a network.

Does what the GRAIL throughput guide promises (rollouts/s, problems/s, peak GPU memory, success rate
per batch size, N-worker and per-window projections) on the real pipeline the daemon runs, full proofs
and signatures included, and adds tokens/s, the proof pass rate against the validator's method, the
score factor against the cap, and JSON for programs.
"""

from __future__ import annotations

import argparse
import sys

from rich.console import Console

from grail_pipeline.cli.arguments import (
    DEFAULT_BATCH_SIZES,
    FULL_BATCH_SIZES,
    add_runtime_arguments,
    apply_memory_cap,
    parse_batch_sizes,
    path_or_default,
    positive_float,
    positive_int,
    whole_int,
)
from grail_pipeline.cli.progress import rate_progress
from grail_pipeline.common.errors import UserError
from grail_pipeline.mining.rules import check_block_time, check_window_blocks, check_writable
from grail_pipeline.protocol.profile import PROFILE
from grail_pipeline.tools.projection import WindowSpec


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("benchmark", help="measure rollouts/s per batch size without a network",
                              description=__doc__.split("\n\n")[0])
    add_runtime_arguments(p, default_model="Qwen/Qwen2.5-3B-Instruct")
    p.add_argument("--batch-sizes", default=None,
                   help="comma list; default 4 for hf (the guide's default), 256 decode slots for fast")
    p.add_argument("--num-problems", type=positive_int, default=10, help="problems per batch size (16 rollouts each)")
    p.add_argument("--workers", type=positive_int, default=1, help="project throughput for N workers")
    p.add_argument("--full-benchmark", action="store_true",
                   help="every batch size: 1,2,4,8,16 for hf; 64,128,256,512 for fast")
    p.add_argument("--seed", type=whole_int, default=42, help="seed of the benchmark's window (problems, randomness)")
    p.add_argument("--warmup-problems", type=whole_int, default=1,
                   help="untimed problems with short completions before each batch size (every kernel compiled once)")
    p.add_argument("--window-blocks", type=positive_int, default=PROFILE.window_length_blocks, metavar="N",
                   help=f"blocks per scoring window for the projections (default {PROFILE.window_length_blocks})")
    p.add_argument("--block-time", type=positive_float, default=PROFILE.block_time_s, help="seconds per block")
    p.add_argument("--verify", type=whole_int, nargs="?", const=16, default=0, metavar="N",
                   help="re-check N rollouts (default 16) per batch size with the validator's method")
    p.add_argument("--json", metavar="PATH", type=path_or_default("--json", "no JSON is written"), help="write every figure as JSON ('-' for stdout)")
    p.add_argument("--shared-prompt-attention", action="store_true",
                   help="fast engine: read each group's shared prompt pages once per decode step (cascade attention, "
                        "inference/decode_attention.py); measured against the default before it becomes one")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.warmup_problems < 0:
        raise UserError("--warmup-problems cannot be negative")
    if args.verify < 0:
        raise UserError("--verify takes a positive number of rollouts")
    spec = WindowSpec(blocks=check_window_blocks(args.window_blocks), block_time_s=check_block_time(args.block_time))
    if args.json and args.json != "-":
        check_writable(args.json, "--json")  # before the run, not after it
    out = sys.stderr if args.json == "-" else sys.stdout
    explicit = parse_batch_sizes(args.batch_sizes) if args.batch_sizes is not None else None
    from grail_pipeline.mining.choices import resolve_choices
    from grail_pipeline.mining.runtime import Runtime
    from grail_pipeline.mining.workload import benchmark_window
    from grail_pipeline.protocol.wallet import load_signer
    from grail_pipeline.tools.benchmark_report import render_report, write_json
    from grail_pipeline.tools.measurement import BatchResult, measure_batch_size

    choices = resolve_choices(args, explicit)  # every flag is checked before anything slow happens
    engine_kind = choices.engine_kind
    note = apply_memory_cap(args)  # before the model allocates anything
    if note:
        print(note, file=sys.stderr)
    if args.full_benchmark:
        sizes = FULL_BATCH_SIZES[engine_kind]
    else:
        sizes = explicit or DEFAULT_BATCH_SIZES[engine_kind]
    signer = load_signer(required=False)
    runtime = Runtime.from_choices(choices)
    window = benchmark_window(args.seed)
    results: list[BatchResult] = []
    console = Console(file=out, width=None if out.isatty() else 150)
    render_report(console, args, runtime, signer, spec, sizes, results, header_only=True)
    try:
        with rate_progress(console) as progress:
            for size in sizes:
                results.append(measure_batch_size(runtime, signer, size, args.num_problems, args.warmup_problems,
                                                  window, args.verify, progress))
    finally:
        runtime.close()
    render_report(console, args, runtime, signer, spec, sizes, results, header_only=False)
    if args.json:
        write_json(args.json, args, runtime, signer, spec, results)
    return 0 if any(r.ok for r in results) else 1
