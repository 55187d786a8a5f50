"""What `grail-pipeline benchmark` prints (rich tables) and writes (JSON)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import transformers
from rich.console import Console
from rich.table import Table

from grail_pipeline import __version__
from grail_pipeline.common.atomic import write_atomically
from grail_pipeline.common.errors import UserError
from grail_pipeline.inference.devices import describe_gpus, driver_version
from grail_pipeline.mining.runtime import Runtime
from grail_pipeline.protocol.wallet import Signer
from grail_pipeline.tools.memory_report import breakdown_line
from grail_pipeline.tools.projection import WindowSpec, on_time
from grail_pipeline.tools.roofline import result_roofline
from grail_pipeline.tools.tables import narrow_table

if TYPE_CHECKING:
    from grail_pipeline.tools.measurement import BatchResult

ENV_KEYS = ("GRAIL_USE_FLASH_ATTENTION", "GRAIL_MULTI_GPU", "CUDA_VISIBLE_DEVICES", "GRAIL_WORKER_ID",
            "GRAIL_TOTAL_WORKERS")
SUCCESS_NOTE = ("Success % = answers that satisfy the formula (the completion's EOS stripped). The validator "
                "scores the text with its trailing <|im_end|>, so its `success` flag is lower: see JSON "
                "validator_success_pct.")


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment() -> dict:
    return dict(
        tool_version=__version__, commit=git_commit(), python=platform.python_version(), torch=torch.__version__,
        transformers=transformers.__version__, cuda=torch.version.cuda, driver=driver_version(),
        gpus=[g.__dict__ for g in describe_gpus()], host=platform.node(),
        env={k: os.environ.get(k) for k in ENV_KEYS if os.environ.get(k) is not None},
    )


def _config(args: argparse.Namespace, runtime: Runtime, spec: WindowSpec, sizes: list[int]) -> dict:
    return dict(model=args.model, model_name=runtime.loaded.name, engine=runtime.engine_kind,
                device=str(runtime.loaded.device), dtype=str(runtime.loaded.dtype).removeprefix("torch."),
                attention=runtime.loaded.attn_implementation, batch_sizes=sizes, num_problems=args.num_problems,
                rollouts_per_problem=16, warmup_problems=args.warmup_problems, workers=args.workers,
                seed=args.seed, max_new_tokens=args.max_new_tokens, max_prompt_tokens=runtime.max_prompt_tokens,
                kv_cache_gb=runtime.kv_cache_gb, shared_prompt_attention=runtime.shared_prompt_attention,
                length_profile=runtime.lengths.spec,
                window=spec.describe(), verify=args.verify)


def render_report(console: Console, args: argparse.Namespace, runtime: Runtime, signer: Signer,
                  spec: WindowSpec, sizes: list[int], results: list["BatchResult"], header_only: bool) -> None:
    if header_only:
        _header(console, args, runtime, signer, spec, sizes)
        return
    _results(console, results)
    _engine_details(console, runtime, results)
    _limits(console, runtime, results)
    _projections(console, args.workers, spec, results)


def _header(console: Console, args, runtime, signer, spec, sizes) -> None:
    table = Table(title="GRAIL THROUGHPUT BENCHMARK", show_header=False, title_justify="left")
    gpus = describe_gpus()
    for g in gpus:
        table.add_row(f"GPU {g.index}", f"{g.name}: {g.free_gb:.1f} GB free of {g.total_gb:.1f} GB")
    if not gpus:
        table.add_row("GPU", "none (running on the CPU)")
    env = {k: os.environ.get(k, "unset") for k in ENV_KEYS[:3]}
    table.add_row("Environment", ", ".join(f"{k}={v}" for k, v in env.items()))
    cfg = _config(args, runtime, spec, sizes)
    table.add_row("Model", f"{cfg['model_name']} ({cfg['dtype']}, {cfg['attention']}, {cfg['device']})")
    table.add_row("Engine", f"{cfg['engine']}, batch sizes {','.join(map(str, sizes))}")
    table.add_row("Workload", f"{args.num_problems} problems × 16 rollouts, lengths {cfg['length_profile']}, "
                              f"max {args.max_new_tokens} new tokens, seed {args.seed}, "
                              f"{args.warmup_problems} warm-up problem(s)")
    table.add_row("Window", spec.describe())
    key = f"ephemeral key {signer.ss58_address} (no wallet set)" if signer.ephemeral else f"hotkey {signer.ss58_address}"
    table.add_row("Signing", key)
    console.print(table)


def _gb(r: "BatchResult") -> str:
    if not r.gpu_reserved_gb and r.gpu_process_gb is None:
        return "-"
    text = f"{r.gpu_reserved_gb:.2f}"
    return text + (f" ({r.gpu_process_gb:.2f})" if r.gpu_process_gb is not None else "")


def _results(console: Console, results: list["BatchResult"]) -> None:
    # problems/s (rollouts/s ÷ 16) is in the JSON: without its column the table fits 80 columns
    table = narrow_table("BENCHMARK RESULTS", ["Batch", "Problems", "Rollouts", "Time\n(s)", "Roll/s", "Tok/s",
                                                "GPU\n(GB)", "Success\n%", "Verified\n%"])
    for r in results:
        if not r.ok:
            table.add_row(str(r.batch_size), *[r.status] + ["-"] * 7)
            continue
        verified = "-"
        if r.verify and "error" in r.verify:
            verified = "not run"
        elif r.verify:
            v = r.verify
            verified = f"{100 * v['rollouts_passed'] / max(1, v['rollouts_checked']):.1f} (n={v['rollouts_checked']})"
        table.add_row(str(r.batch_size), str(r.problems), str(r.rollouts), f"{r.seconds:.1f}",
                      f"{r.rollouts_per_s:.2f}", f"{r.tokens_per_s:.0f}", _gb(r),
                      f"{r.success_pct:.1f}", verified)
    console.print(table)
    console.print("GPU (GB) = peak torch reserved (process total from NVML in brackets, where available). "
                  + SUCCESS_NOTE, style="dim")
    for r in results:
        if r.ok and r.memory:
            console.print(f"memory at batch {r.batch_size}: {breakdown_line(r.memory)}", style="dim")
    for r in results:
        if r.ok and r.verify and "error" in r.verify:
            console.print(f"batch {r.batch_size}: proofs not re-verified: {r.verify['error']}", style="bold red")
    checked = sorted({r.verify["model_path"] for r in results if r.ok and r.verify and "error" not in r.verify})
    if checked:
        console.print("Verified % = rollouts whose every sketch and logprob pass the validator's method, checked in a "
                      f"separate process on the model loaded from {', '.join(checked)}.", style="dim")
    for r in results:
        preempted = (r.engine or {}).get("preemptions", 0) if r.ok else 0
        if preempted:
            console.print(f"batch {r.batch_size}: {preempted} group(s) preempted for want of KV pages and run again "
                          f"({r.engine['preempted_tokens']} tokens dropped; {r.engine['peak_kv_pages']} pages held at "
                          "most): a larger --kv-cache-gb runs them once", style="yellow")
    dropped = sum(r.dropped_groups for r in results)
    if dropped:
        console.print(f"{dropped} group(s) dropped: a completion shorter than 16 tokens voids the whole group.")


def _engine_details(console: Console, runtime: Runtime, results: list["BatchResult"]) -> None:
    table = narrow_table("WHERE THE TIME WENT", ["Batch", "Start-up\n(s)", "Step\n(ms)", "Occupancy",
                                                  "Generate\n(s)", "Prove\n(s)", "Sign\n(s)", "Sink\n(s)"])
    for r in results:
        if not r.ok:
            continue
        st, en = r.stage_seconds, r.engine
        table.add_row(str(r.batch_size), f"{r.startup_seconds:.1f}", f"{en.get('step_ms', 0):.2f}",
                      f"{en.get('batch_occupancy', 0):.2f}", f"{st.get('generate', 0):.1f}",
                      f"{st.get('prove', 0):.1f}", f"{st.get('sign', 0):.1f}", f"{st.get('sink', 0):.2f}")
    console.print(table)


def _limits(console: Console, runtime: Runtime, results: list["BatchResult"]) -> None:
    """Per batch size: the floor of each pass per rollout (the larger of its compute and bandwidth bounds) beside
    what the decode step and the prove stage took per rollout, the rate the floors allow together, and the share
    of it reached. Nothing off the GPU (no ceilings to measure)."""
    rows = [(r, result_roofline(runtime, r)) for r in results if r.ok]
    rows = [(r, line) for r, line in rows if line is not None]
    if not rows:
        return
    table = Table(title="AGAINST THE CARD'S LIMIT (ms per rollout)", title_justify="left")
    for col in ("Batch", "Decode bound", "Decode", "Proof bound", "Proof busy", "Limit roll/s", "Reached"):
        table.add_column(col, justify="right")
    for r, line in rows:
        decode, proof = line["decode_per_rollout"], line["proof_per_rollout"]
        busy = "-" if proof["busy_ms"] is None else f"{proof['busy_ms']:.2f}"
        table.add_row(str(r.batch_size), f"{max(decode['compute_ms'], decode['bandwidth_ms']):.2f}",
                      f"{decode['measured_ms']:.2f}", f"{max(proof['compute_ms'], proof['bandwidth_ms']):.2f}", busy,
                      f"{line['limit_rollouts_per_s']:.1f}", f"{line['fraction_of_limit']:.0%}")
    console.print(table)


def _projections(console: Console, workers: int, spec: WindowSpec, results: list["BatchResult"]) -> None:
    ok = [r for r in results if r.ok and r.rollouts]
    if not ok:
        console.print("No batch size completed.")
        return
    console.print(f"PROJECTED {workers}-WORKER THROUGHPUT", style="italic")
    console.print(f"window: {spec.describe()}, cap {spec.cap} rollouts/window = {spec.cap_rate():.1f} rollouts/s",
                  style="dim")
    table = narrow_table(None, ["Batch", "Rollouts/s", "Generated\nper window", "On time\nper window",
                                "Score\nfactor", "Hotkeys\nat cap"])
    for r in ok:
        rate = r.rollouts_per_s * workers
        in_file = on_time(spec, r, workers)
        table.add_row(str(r.batch_size), f"{rate:.1f}", f"~{spec.rollouts_per_window(rate):.0f}", f"~{in_file:.0f}",
                      f"{spec.score_factor(in_file):.3f}", str(spec.hotkeys_at_cap(in_file)))
    console.print(table)
    console.print("On time = what reaches the window's file before its deadline: generation stops early enough for "
                  "the groups in flight (slots + queue) to drain and the file to upload at 100 Mbit/s, and the file is "
                  "due 4 s before the window ends (mine's deadline plan does the same, measured). Score factor = "
                  "min(1, on-time rollouts per window / cap) ^ 4 for one hotkey. Hotkeys at cap = how many hotkeys' "
                  "whole caps the on-time rollouts fill (`mine --hotkeys` mines them from one engine, each its own "
                  "file). The projection multiplies one worker's rate by the number of workers.", style="dim")
    best = max(ok, key=lambda r: r.rollouts_per_s)
    console.print(f"BEST: batch_size={best.batch_size} -> {best.rollouts_per_s:.2f} rollouts/s"
                  + (f"; with {workers} workers: ~{best.rollouts_per_s * workers:.1f} rollouts/s" if workers > 1 else ""),
                  style="bold")


def report_dict(args: argparse.Namespace, runtime: Runtime, signer: Signer, spec: WindowSpec,
                results: list["BatchResult"]) -> dict:
    ok = [r for r in results if r.ok and r.rollouts]
    best = max(ok, key=lambda r: r.rollouts_per_s) if ok else None
    return dict(
        kind="grail-pipeline-benchmark",
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        command=" ".join(sys.argv),
        environment=environment(),
        config=_config(args, runtime, spec, [r.batch_size for r in results]),
        signing=dict(ephemeral=signer.ephemeral, hotkey=signer.ss58_address),
        success_definition=SUCCESS_NOTE,
        results=[dict(r.as_dict(), roofline=result_roofline(runtime, r)) for r in results],
        projection=[dict(batch_size=r.batch_size, workers=args.workers,
                         rollouts_per_s=r.rollouts_per_s * args.workers,
                         generated_per_window=spec.rollouts_per_window(r.rollouts_per_s * args.workers),
                         on_time_per_window=on_time(spec, r, args.workers),
                         score_factor=spec.score_factor(on_time(spec, r, args.workers)),
                         hotkeys_at_cap=spec.hotkeys_at_cap(on_time(spec, r, args.workers)))
                    for r in ok],
        best=None if best is None else dict(batch_size=best.batch_size, rollouts_per_s=best.rollouts_per_s),
    )


def write_json(path: str, args, runtime, signer, spec, results) -> None:
    text = json.dumps(report_dict(args, runtime, signer, spec, results), indent=2, default=str)
    if path == "-":
        print(text)
    else:
        try:
            write_atomically(path, text.encode())
        except OSError as exc:
            raise UserError(f"cannot write --json {path}: {exc.strerror or exc}") from None
