"""`grail-pipeline benchmark`: rollouts per second on this box, without a network.

Does what the GRAIL throughput guide promises (rollouts/s, problems/s, peak GPU memory, success rate
per batch size, N-worker and per-window projections) on the real pipeline the daemon runs, full proofs
and signatures included, and adds tokens/s, the proof pass rate against the validator's method, the
score factor against the cap, and JSON for programs.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import math
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field

import anyio
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from grail_pipeline.common.errors import UserError
from grail_pipeline.inference.devices import PeakGpuMemory
from grail_pipeline.mining.messages import ProblemTask, SignedGroup, WindowContext, make_task
from grail_pipeline.mining.runtime import (
    DEFAULT_BATCH_SIZES,
    FULL_BATCH_SIZES,
    Runtime,
    add_runtime_arguments,
    parse_batch_sizes,
    positive_float,
    positive_int,
    preflight,
)
from grail_pipeline.protocol.profile import PROFILE
from grail_pipeline.protocol.wallet import Signer, load_signer
from grail_pipeline.proving.validator import verify_rollout
from grail_pipeline.tools.benchmark_report import render_report, write_json
from grail_pipeline.tools.projection import WindowSpec

# Problems are derived for a fixed, well-known hotkey so every machine benchmarks the same workload.
BENCHMARK_HOTKEY = "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY"
WARMUP_INDEX_OFFSET = 1_000_000
WARMUP_MAX_TOKENS = 64


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
    p.add_argument("--seed", type=int, default=42, help="seed of the benchmark's window (problems, randomness)")
    p.add_argument("--warmup-problems", type=int, default=1,
                   help=f"untimed problems before each batch size (lengths capped at {WARMUP_MAX_TOKENS} tokens)")
    p.add_argument("--window-blocks", type=positive_int, default=PROFILE.window_length_blocks)
    p.add_argument("--block-time", type=positive_float, default=PROFILE.block_time_s, help="seconds per block")
    p.add_argument("--verify", type=int, nargs="?", const=16, default=0, metavar="N",
                   help="re-check N rollouts (default 16) per batch size with the validator's method")
    p.add_argument("--json", metavar="PATH", help="write every figure as JSON ('-' for stdout)")
    p.set_defaults(func=run)


@dataclass
class BatchResult:
    """One row of the results table."""

    batch_size: int
    status: str = "ok"
    problems: int = 0
    rollouts: int = 0
    dropped_groups: int = 0
    seconds: float = 0.0
    completion_tokens: int = 0
    gpu_reserved_gb: float = 0.0
    gpu_process_gb: float | None = None
    solved: int = 0
    validator_success: int = 0
    reward_sum: float = 0.0
    startup_seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    max_queue_depth: dict[str, int] = field(default_factory=dict)
    stage_cpu_seconds: dict[str, float] = field(default_factory=dict)
    engine: dict[str, float] = field(default_factory=dict)
    verify: dict[str, float] | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def rollouts_per_s(self) -> float:
        return self.rollouts / self.seconds if self.seconds else 0.0

    @property
    def problems_per_s(self) -> float:
        return self.problems / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds else 0.0

    @property
    def success_pct(self) -> float:
        return 100.0 * self.solved / self.rollouts if self.rollouts else 0.0

    def as_dict(self) -> dict:
        out = asdict(self)
        out.update(rollouts_per_s=self.rollouts_per_s, problems_per_s=self.problems_per_s,
                   tokens_per_s=self.tokens_per_s, success_pct=self.success_pct,
                   validator_success_pct=100.0 * self.validator_success / self.rollouts if self.rollouts else 0.0,
                   mean_reward=self.reward_sum / self.rollouts if self.rollouts else 0.0)
        return out


class BenchmarkSink:
    """Counts finished groups, drives the progress bar and keeps the records picked for verification."""

    def __init__(self, result: BatchResult, progress: Progress | None, sample_groups: set[int],
                 sample_size: int) -> None:
        self.result = result
        self.progress = progress
        self.task = progress.add_task(f"batch {result.batch_size}", total=None, rate="") if progress else None
        self.sample_groups = sample_groups
        self.sample_size = sample_size
        self.sample: list[dict] = []
        self.started = time.perf_counter()

    async def put(self, group: SignedGroup) -> None:
        r = self.result
        r.problems += 1
        r.completion_tokens += group.completion_tokens
        if group.dropped:
            r.dropped_groups += 1
        r.rollouts += group.rollouts
        r.solved += sum(group.solved) if not group.dropped else 0
        r.validator_success += sum(group.successes) if not group.dropped else 0
        r.reward_sum += sum(group.rewards) if not group.dropped else 0.0
        if group.task.index in self.sample_groups:
            self.sample.extend(group.records[: self.sample_size - len(self.sample)])
        if self.progress is not None:
            rate = r.rollouts / max(1e-9, time.perf_counter() - self.started)
            self.progress.update(self.task, completed=r.rollouts, rate=f"{rate:.2f} roll/s")


def benchmark_window(seed: int) -> WindowContext:
    """A replayable stand-in for a window: block hash and proof randomness from the seed."""
    block_hash = "0x" + hashlib.sha256(f"grail-pipeline-benchmark|block|{seed}".encode()).hexdigest()
    drand = hashlib.sha256(f"grail-pipeline-benchmark|drand|{seed}".encode()).hexdigest()
    randomness = hashlib.sha256((block_hash + drand).encode()).hexdigest()
    return WindowContext(window_start=0, block_hash=block_hash, randomness=randomness)


def sample_groups(num_problems: int, sample_size: int) -> set[int]:
    """Problem indices spread evenly over the run whose rollouts are re-verified."""
    if sample_size <= 0:
        return set()
    groups = min(num_problems, math.ceil(sample_size / PROFILE.rollouts_per_problem))
    return {round(i * (num_problems - 1) / max(1, groups - 1)) for i in range(groups)}


async def benchmark_tasks(runtime: Runtime, window: WindowContext, indices: range,
                 cap: int | None = None) -> AsyncIterator[ProblemTask]:
    """The run's problems; `cap` shortens target lengths (warm-up only needs every kernel once)."""
    for index in indices:
        task = make_task(window, index, BENCHMARK_HOTKEY, runtime.tokenizer, runtime.lengths)
        if cap is not None:
            task.targets = [None if t is None else min(t, cap) for t in task.targets]
        yield task


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return any(_is_oom(e) for e in exc.exceptions)
    return False


def find_user_error(exc: BaseException) -> UserError | None:
    if isinstance(exc, UserError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = find_user_error(inner)
            if found is not None:
                return found
    return None


def measure_batch_size(runtime: Runtime, signer: Signer, batch_size: int, num_problems: int,
                       warmup_problems: int, window: WindowContext, verify: int,
                       progress: Progress | None) -> BatchResult:
    """Warm up, then run `num_problems` through the pipeline at one batch size."""
    result = BatchResult(batch_size=batch_size)
    engine = None
    try:
        with PeakGpuMemory(runtime.loaded.device) as memory:
            t0 = time.perf_counter()
            engine = runtime.engine(batch_size)
            runtime.prover()  # made once per run: the first batch size's start-up includes it
            result.startup_seconds = time.perf_counter() - t0
            if warmup_problems > 0:
                warm = BatchResult(batch_size=batch_size)
                pipeline = runtime.pipeline(engine, signer)
                indices = range(WARMUP_INDEX_OFFSET, WARMUP_INDEX_OFFSET + warmup_problems)
                anyio.run(pipeline.run, benchmark_tasks(runtime, window, indices, cap=WARMUP_MAX_TOKENS),
                          BenchmarkSink(warm, None, set(), 0))
                engine.reset_stats()
            pipeline = runtime.pipeline(engine, signer)
            sink = BenchmarkSink(result, progress, sample_groups(num_problems, verify), verify)
            _synchronize(runtime)
            t0 = time.perf_counter()
            anyio.run(pipeline.run, benchmark_tasks(runtime, window, range(num_problems)), sink)
            _synchronize(runtime)
            result.seconds = time.perf_counter() - t0
        result.gpu_reserved_gb, result.gpu_process_gb = memory.reserved_gb, memory.process_gb
        result.stage_seconds = pipeline.stage_seconds()
        result.max_queue_depth = dict(pipeline.times.max_depth)
        result.stage_cpu_seconds = {k: round(v, 3) for k, v in pipeline.times.cpu.items()}
        result.engine = engine.stats.as_dict()
        if verify:
            result.verify = verify_sample(runtime, sink.sample)
    except BaseException as exc:  # noqa: BLE001 - sorted below: OOM is a result, anything else re-raised
        user = find_user_error(exc)
        if user is not None:
            raise user from None
        if not _is_oom(exc):
            raise
        result.status = "OOM"
    finally:
        del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return result


def _synchronize(runtime: Runtime) -> None:
    if runtime.loaded.device.type == "cuda":
        torch.cuda.synchronize(runtime.loaded.device)


def verify_sample(runtime: Runtime, records: list[dict]) -> dict[str, float]:
    """The validator's method (unbatched forward) on every position of the sampled rollouts."""
    totals = dict(rollouts_checked=0, rollouts_passed=0, positions_checked=0, positions_passed=0,
                  logprobs_checked=0, logprobs_passed=0)
    for record in records:
        res = verify_rollout(runtime.loaded.model, record)
        totals["rollouts_checked"] += 1
        totals["rollouts_passed"] += int(res.passed)
        totals["positions_checked"] += res.positions_checked
        totals["positions_passed"] += res.positions_passed
        totals["logprobs_checked"] += res.logprobs_checked
        totals["logprobs_passed"] += res.logprobs_passed
    return totals


def run(args: argparse.Namespace) -> int:
    if args.warmup_problems < 0:
        raise UserError("--warmup-problems cannot be negative")
    if args.verify < 0:
        raise UserError("--verify takes a positive number of rollouts")
    spec = WindowSpec(blocks=args.window_blocks, block_time_s=args.block_time)
    out = sys.stderr if args.json == "-" else sys.stdout
    explicit = parse_batch_sizes(args.batch_sizes) if args.batch_sizes is not None else None
    engine_kind = preflight(args, explicit)  # every flag is checked before anything slow happens
    if args.full_benchmark:
        sizes = FULL_BATCH_SIZES[engine_kind]
    else:
        sizes = explicit or DEFAULT_BATCH_SIZES[engine_kind]
    signer = load_signer(required=False)
    runtime = Runtime.from_args(args)
    window = benchmark_window(args.seed)
    results: list[BatchResult] = []
    from rich.console import Console

    console = Console(file=out, width=None if out.isatty() else 150)
    render_report(console, args, runtime, signer, spec, sizes, results, header_only=True)
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), console=console, transient=True) as progress:
            for size in sizes:
                results.append(measure_batch_size(runtime, signer, size, args.num_problems, args.warmup_problems,
                                                  window, args.verify, progress))
    finally:
        runtime.close()
    render_report(console, args, runtime, signer, spec, sizes, results, header_only=False)
    if args.json:
        write_json(args.json, args, runtime, signer, spec, results)
    return 0 if any(r.ok for r in results) else 1
