"""Where a W1 run's GPU time goes: the pipeline under the profiler, the decode step alone, the prover alone.

Three parts, one process, the model loaded once (as a validator loads it, from the checkpoint directory):

1. The whole pipeline (`measure_batch_size`, the benchmark's own run) at one slot count, with torch's
   profiler (CUDA activity only) switched on for a slice of seconds in the middle of the run. From the
   kernels of that slice: the GPU busy share (union of kernel intervals on any stream), device time per
   stream (the engine's decode and prefill graphs run on one, the prover's passes on its own), and the
   kernels by kind (matrix products, attention, Triton-fused elementwise, sort/top-k, PyTorch
   elementwise and reductions, copies).
2. The decode step alone: the captured graph replayed back to back at each decode width the engine
   has (CUDA events, median of repeats), with the step's kernels by kind at full width.
3. The prover alone on W1-shaped groups: device milliseconds per rollout (profiler) and wall milliseconds
   per rollout (host and device together), so host-bound and device-bound time are told apart.

    python bench/pipeline_profile.py --slots 512 --problems 96 --out $OUT

Writes `pipeline_profile_<gpu>_<date>.json` to --out and prints a short table last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from proof_exactness import jobs_for  # bench scripts run with bench/ on the path
from torch.profiler import ProfilerActivity, profile

from grail_pipeline.mining.runtime import Runtime
from grail_pipeline.mining.workload import benchmark_window
from grail_pipeline.protocol.wallet import load_signer
from grail_pipeline.tools.benchmark_report import environment
from grail_pipeline.tools.measurement import measure_batch_size

KINDS = (  # first match wins; names as CUPTI reports them
    ("attention", ("decode_attention", "fmha", "flash", "cudnn", "sdpa", "attention")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "cublas", "splitk", "gemv")),
    ("topk_sort", ("topk", "sort", "radix", "select")),
    ("triton_fused", ("triton_",)),
    ("reduce", ("reduce",)),
    ("index_scatter", ("index", "scatter", "gather", "put_")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "fill", "cat", "copy")),
    ("memcpy", ("memcpy", "memset")),
)


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, marks in KINDS:
        if any(m in low for m in marks):
            return kind
    return "other"


def kernel_events(prof) -> list[dict]:
    """Every GPU activity of a finished profile as dicts: name, stream, start and duration in microseconds."""
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"trace_{os.getpid()}_{time.monotonic_ns()}.json"
    prof.export_chrome_trace(str(path))
    trace = json.loads(path.read_text())
    path.unlink()
    out = []
    for e in trace.get("traceEvents", []):
        if e.get("ph") != "X" or e.get("cat") not in ("kernel", "gpu_memcpy", "gpu_memset"):
            continue
        out.append(dict(name=e.get("name", ""), stream=(e.get("args") or {}).get("stream", e.get("tid")),
                        ts=float(e["ts"]), dur=float(e.get("dur", 0.0))))
    return out


def summarize(events: list[dict], wall_us: float | None = None) -> dict:
    """Busy share (union of intervals), per-stream device time, device time by kind, top kernels."""
    if not events:
        return dict(kernels=0)
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events)
    busy, cur_s, cur_e = 0.0, spans[0][0], spans[0][1]
    for s, e in spans[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    first, last = spans[0][0], max(e for _, e in spans)
    wall = wall_us or (last - first)
    per_stream: dict[str, float] = defaultdict(float)
    per_kind: dict[str, float] = defaultdict(float)
    per_name: dict[str, float] = defaultdict(float)
    for e in events:
        per_stream[str(e["stream"])] += e["dur"]
        per_kind[kind_of(e["name"])] += e["dur"]
        per_name[e["name"][:90]] += e["dur"]
    total = sum(per_kind.values())
    return dict(kernels=len(events), wall_ms=wall / 1e3, busy_ms=busy / 1e3, busy_share=busy / wall if wall else 0,
                device_ms=total / 1e3,
                per_stream_ms={k: round(v / 1e3, 2) for k, v in sorted(per_stream.items(), key=lambda kv: -kv[1])},
                by_kind_share={k: round(v / total, 4) for k, v in sorted(per_kind.items(), key=lambda kv: -kv[1])},
                top_kernels_ms=[(n, round(v / 1e3, 2)) for n, v in sorted(per_name.items(), key=lambda kv: -kv[1])[:25]])


def pipeline_slice(runtime, signer, slots: int, problems: int, warmup: int, start_s: float, slice_s: float) -> dict:
    """The benchmark's run with the profiler on for `slice_s` seconds from `start_s` after the run's start."""
    window = benchmark_window(42)
    prof = profile(activities=[ProfilerActivity.CUDA])
    state: dict = {}

    def timer() -> None:
        time.sleep(start_s)
        prof.start()
        state["t0"] = time.perf_counter()
        time.sleep(slice_s)
        prof.stop()
        state["wall_us"] = (time.perf_counter() - state["t0"]) * 1e6

    # the timer starts once warm-up is over: the warm-up is a few problems at the start of measure_batch_size
    thread = threading.Thread(target=timer, daemon=True)
    original = runtime.pipeline

    def pipeline(engine, signer_):
        made = original(engine, signer_)
        state["pipelines"] = state.get("pipelines", 0) + 1
        if state["pipelines"] == 2:  # the measured run's pipeline (the first is the warm-up's)
            thread.start()
        return made

    runtime.pipeline = pipeline
    try:
        result = measure_batch_size(runtime, signer, slots, problems, warmup, window, 0, progress=None)
    finally:
        runtime.pipeline = original
    thread.join()
    row = result.as_dict()
    summary = summarize(kernel_events(prof), state.get("wall_us"))
    return dict(result=row, profile_slice=dict(start_s=start_s, seconds=slice_s, **summary))


def time_graph(fn, reps: int = 30) -> float:
    """Median milliseconds of `fn` replayed back to back (CUDA events)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def decode_alone(runtime, slots: int) -> dict:
    """The decode step's graph replayed alone at each width the engine captured, and its kernels at full width."""
    engine = runtime.engine(slots)
    runner = engine.runner
    # W1's contexts (prompt ~270 plus a completion under way: 270..1,000) over random keys and values, so the
    # attention reads what it reads in a run rather than the one key of a parked slot
    runner.kv.k.normal_()
    runner.kv.v.normal_()
    table = runner.kv.table  # every slot its own pages for its whole row (the default cache holds them all)
    table.copy_(1 + torch.arange(table.numel(), device=table.device, dtype=table.dtype).view_as(table))
    runner.positions.copy_(torch.randint(270, 1000, (slots,), device=runner.positions.device))
    out: dict = dict(slots=slots, startup_s=engine.startup_seconds, step_ms={})
    for width in runner.widths:
        out["step_ms"][width] = round(time_graph(lambda w=width: runner.step(w)), 3)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            runner.step(slots)
        torch.cuda.synchronize()
    out["kernels_full_width"] = summarize(kernel_events(prof))
    del engine
    torch.cuda.empty_cache()
    return out


def prover_alone(runtime, groups: int) -> dict:
    """Device and wall milliseconds per rollout of the runtime's prover on W1-shaped groups."""
    prover = runtime.prover()
    jobs = jobs_for(groups, seed=11)
    rollouts = sum(len(j.completions) for j in jobs)
    prover.prove_many(jobs[:2])
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    prover.prove_many(jobs)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        prover.prove_many(jobs)
        torch.cuda.synchronize()
    summary = summarize(kernel_events(prof))
    return dict(prover=type(prover).__name__, rollouts=rollouts, wall_ms_per_rollout=1000 * wall / rollouts,
                device_ms_per_rollout=summary["device_ms"] / rollouts, kernels=summary)


def device_work(report: dict) -> dict | None:
    """The run's device work timed alone, over its wall time: above 1, the GPU (not the host) bounds the run.

    Decode: the run's steps at its mean computed width, each at the step time alone interpolated between the
    captured widths; the prover: its device time per rollout alone, times the run's rollouts. Read off the
    committed profiles of 2026-12-02 (`results/h200-2026-12-02/`): 0.98 after-1 (31.6 s of work alone in a
    32.2-s run), so removing host time can only turn the remaining gaps into overlap.
    """
    if not {"pipeline", "decode_alone", "prover_alone"} <= report.keys():
        return None
    result = report["pipeline"]["result"]
    engine, widths = result["engine"], report["decode_alone"]["step_ms"]
    rows = engine.get("computed_rows_share", 1.0) * result["batch_size"]  # 1.0: before the narrow widths
    step_ms = float(np.interp(rows, [int(w) for w in widths], list(widths.values())))
    decode_s = engine["decode_steps"] * step_ms / 1e3
    prove_s = result["rollouts"] * report["prover_alone"]["device_ms_per_rollout"] / 1e3
    return dict(mean_rows=round(rows, 1), step_ms_alone=round(step_ms, 3), decode_s=round(decode_s, 2),
                prove_s=round(prove_s, 2), run_s=round(result["seconds"], 2),
                share_of_run=round((decode_s + prove_s) / result["seconds"], 3))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="dummy:qwen2.5-3b")
    p.add_argument("--slots", type=int, default=512)
    p.add_argument("--problems", type=int, default=96)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--slice-start", type=float, default=12.0, help="seconds into the measured run")
    p.add_argument("--slice-seconds", type=float, default=3.0)
    p.add_argument("--prover-groups", type=int, default=8)
    p.add_argument("--max-prompt-tokens", type=int, default=384)
    p.add_argument("--skip", default="", help="comma list of parts to skip: pipeline,decode,prover")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    ns = argparse.Namespace(model=args.model, engine="fast", device="cuda", max_new_tokens=1024,
                            length_profile=None, max_prompt_tokens=args.max_prompt_tokens)
    runtime = Runtime.from_args(ns)
    signer = load_signer(required=False)
    report: dict = dict(kind="grail-pipeline-profile", created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        command="python bench/pipeline_profile.py " + " ".join(
                            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
                        environment=environment())
    try:
        if "pipeline" not in skip:
            report["pipeline"] = pipeline_slice(runtime, signer, args.slots, args.problems, args.warmup,
                                                args.slice_start, args.slice_seconds)
        if "decode" not in skip:
            report["decode_alone"] = decode_alone(runtime, args.slots)
        if "prover" not in skip:
            report["prover_alone"] = prover_alone(runtime, args.prover_groups)
    finally:
        runtime.close()
    report["device_work"] = device_work(report)
    gpu = torch.cuda.get_device_name().replace(" ", "-").replace("/", "-")
    path = Path(args.out) / f"pipeline_profile_{gpu}_{time.strftime('%Y-%m-%d_%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {path}")
    if "pipeline" in report:
        r, s = report["pipeline"]["result"], report["pipeline"]["profile_slice"]
        print(f"pipeline {args.slots} slots: {r.get('rollouts_per_s', 0):.2f} roll/s, step {r['engine'].get('step_ms')} ms,"
              f" occupancy {r['engine'].get('batch_occupancy')}; slice: GPU busy {s.get('busy_share', 0):.1%},"
              f" streams {s.get('per_stream_ms')}, kinds {s.get('by_kind_share')}")
    if "decode_alone" in report:
        d = report["decode_alone"]
        print(f"decode alone: step ms by width {d['step_ms']}; kinds {d['kernels_full_width'].get('by_kind_share')}")
    if "prover_alone" in report:
        q = report["prover_alone"]
        print(f"prover alone ({q['prover']}): wall {q['wall_ms_per_rollout']:.2f} ms/rollout, device "
              f"{q['device_ms_per_rollout']:.2f} ms/rollout; kinds {q['kernels'].get('by_kind_share')}")
    if report["device_work"] is not None:
        w = report["device_work"]
        print(f"device work alone: decode {w['decode_s']} s ({w['mean_rows']} rows at {w['step_ms_alone']} ms) + prover "
              f"{w['prove_s']} s = {w['share_of_run']:.0%} of the {w['run_s']}-s run")


if __name__ == "__main__":
    main()
