"""The benchmark's measurement: one batch size through the real pipeline, timed, with its memory and stages.

`measure_batch_size` is what `benchmark` reports per row, what `calibrate` sweeps, and what the bench
scripts compare across engines: warm-up, then `num_problems` problems through the same pipeline the
daemon runs (full proofs and signatures), timed from the first task to the last group in the sink, with
the peak GPU memory and its breakdown (inference/memory.py), busy seconds per stage, the engine's counters, and optionally a sample re-verified
with the validator's method. An out-of-memory error is a row ("OOM"), not a crash.
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import asdict, dataclass, field

import anyio
import torch
from rich.progress import Progress

from grail_pipeline.common.errors import UserError, find_in_group
from grail_pipeline.inference.devices import PeakGpuMemory
from grail_pipeline.inference.loading import LoadedModel
from grail_pipeline.inference.memory import Component, DeviceMemory, breakdown, module_bytes
from grail_pipeline.mining.chain import WindowContext
from grail_pipeline.mining.messages import SignedGroup
from grail_pipeline.mining.runtime import Runtime
from grail_pipeline.mining.workload import benchmark_tasks, warm_up
from grail_pipeline.protocol.profile import PROFILE
from grail_pipeline.protocol.wallet import Signer
from grail_pipeline.proving.validator import verify_sample
from grail_pipeline.proving.validator_process import CheckUnavailable, ValidatorProcess


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
    prompt_tokens: int = 0  # summed over groups (one prompt per group)
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
    verify: dict | None = None  # verify_independently's totals and the model path the check loaded
    memory: dict | None = None  # where the peak went (memory.breakdown)

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
                 sample_size: int, num_problems: int) -> None:
        self.result = result
        self.progress = progress
        self.task = progress.add_task(f"batch {result.batch_size}: rollouts", rate="",
                                      total=num_problems * PROFILE.rollouts_per_problem) if progress else None
        self.sample_groups = sample_groups
        self.sample_size = sample_size
        self.sample: list[dict] = []
        self.started = time.perf_counter()

    async def put(self, group: SignedGroup) -> None:
        r = self.result
        r.problems += 1
        r.completion_tokens += group.completion_tokens
        r.prompt_tokens += len(group.task.prompt_ids)
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


def sample_groups(num_problems: int, sample_size: int) -> set[int]:
    """Problem indices spread evenly over the run whose rollouts are re-verified."""
    if sample_size <= 0:
        return set()
    groups = min(num_problems, math.ceil(sample_size / PROFILE.rollouts_per_problem))
    return {round(i * (num_problems - 1) / max(1, groups - 1)) for i in range(groups)}


def measure_batch_size(runtime: Runtime, signer: Signer, batch_size: int, num_problems: int,
                       warmup_problems: int, window: WindowContext, verify: int,
                       progress: Progress | None) -> BatchResult:
    """Warm up, then run `num_problems` through the pipeline at one batch size; then re-verify `verify`
    rollouts with the validator's method in a process of its own (proving/validator_process.py), once the
    engine's memory is given back."""
    result = BatchResult(batch_size=batch_size)
    engine = None
    sample: list[dict] = []
    try:
        ledger = DeviceMemory(runtime.loaded.device)
        with PeakGpuMemory(runtime.loaded.device) as memory:
            t0 = time.perf_counter()
            with ledger.phase("engine"):
                engine = runtime.engine(batch_size)
            with ledger.phase("prover"):
                prover = runtime.prover()  # made once per run: the first batch size's start-up includes it
            result.startup_seconds = time.perf_counter() - t0
            with ledger.phase("warm-up"):
                if warmup_problems > 0:
                    anyio.run(warm_up, runtime.pipeline(engine, signer), runtime, window, warmup_problems)
                    engine.reset_stats()
            pipeline = runtime.pipeline(engine, signer)
            sink = BenchmarkSink(result, progress, sample_groups(num_problems, verify), verify, num_problems)
            with ledger.phase("run") as run:
                t0 = time.perf_counter()
                anyio.run(pipeline.run, benchmark_tasks(runtime, window, range(num_problems)), sink)
                _synchronize(runtime)
                result.seconds = time.perf_counter() - t0
            if progress is not None and sink.task is not None:
                progress.stop_task(sink.task)  # its clock stops with the run
        # each phase resets the allocator's peak: the run's peak is the largest of theirs
        result.gpu_reserved_gb = max(memory.reserved_gb, ledger.peak_reserved / 1e9)
        result.gpu_process_gb = memory.process_gb
        result.memory = memory_breakdown(runtime, engine, prover, ledger, run)
        result.stage_seconds = pipeline.stage_seconds()
        result.max_queue_depth = dict(pipeline.times.max_depth)
        result.stage_cpu_seconds = {k: round(v, 3) for k, v in pipeline.times.cpu.items()}
        result.engine = engine.stats.as_dict()
        sample = sink.sample
    except BaseException as exc:  # noqa: BLE001 - sorted below: OOM is a result, anything else re-raised
        user = find_in_group(exc, UserError)
        if user is not None:
            raise user from None
        if find_in_group(exc, torch.OutOfMemoryError) is None:
            raise
        result.status = "OOM"
    finally:
        del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if verify and result.ok:
        task = progress.add_task(f"batch {batch_size}: re-verifying {len(sample)} rollouts with the validator's "
                                 "method (a process of its own)", total=None, rate="") if progress else None
        result.verify = verify_independently(runtime.loaded, sample)
        if progress is not None and task is not None:
            progress.stop_task(task)
    return result


def memory_breakdown(runtime: Runtime, engine, prover, ledger: DeviceMemory, run) -> dict:
    """The peak broken down: weights, what the engine and the prover report holding, and the run's workspace."""
    parts = [Component("weights", module_bytes(runtime.loaded.model), "exact", "parameters and buffers")]
    parts += getattr(engine, "memory", [])  # the fast engine's KV cache, buffers and graphs
    parts += prover.memory() if hasattr(prover, "memory") else []  # the prefix prover's
    if run.measured:
        parts.append(Component("run_workspace", run.transient, "measured",
                               "the run's peak allocation above what it held at its end: the prover's passes, "
                               "logits, the pipeline's tensors"))
    peak = ledger.peak_reserved if ledger.on_gpu else None
    return dict(breakdown(parts, peak), phases=[vars(p) for p in ledger.phases] if ledger.on_gpu else [])


def verify_independently(loaded: LoadedModel, records: list[dict]) -> dict:
    """The validator's method on `records`, on a model loaded from the checkpoint in a fresh process."""
    if not records:
        return {**verify_sample(loaded.model, []), "model_path": loaded.source}
    with ValidatorProcess(loaded.source, str(loaded.device)) as check:
        try:
            return check.verify(records)
        except CheckUnavailable as exc:  # the measurement stands; the report says the check did not run
            return {"error": str(exc), "model_path": loaded.source}


def _synchronize(runtime: Runtime) -> None:
    if runtime.loaded.device.type == "cuda":
        torch.cuda.synchronize(runtime.loaded.device)
