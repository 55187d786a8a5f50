"""A 24 GB card rehearsed on an H100: `calibrate --memory-gb 24 --headroom-gb 2` on W1, then the benchmark at the
configuration it chose, under the same cap (issue #15).

Both commands run as the user runs them (subprocesses of the installed CLI); this script only picks small
problem counts so that the whole run stays under about four minutes on an H100, and writes one JSON:
the commands, the commit, the device, the chosen configuration, the peak reserved memory, its breakdown
and rollouts/s.

    python bench/memory_24gb.py --out bench/results
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml


def run(command: list[str]) -> float:
    print("+", " ".join(command), flush=True)
    t0 = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="dummy:qwen2.5-3b", help="W1; dummy:qwen3-4b is W2")
    p.add_argument("--memory-gb", type=float, default=24.0)
    p.add_argument("--headroom-gb", type=float, default=2.0)
    p.add_argument("--batch-sizes", default="64,128,256", help="what calibrate measures (256 should not fit)")
    p.add_argument("--calibrate-problems", type=int, default=None,
                   help="problems per size; default calibrate's own (enough to fill the batch twice: 8 left 256 slots half empty)")
    p.add_argument("--benchmark-problems", type=int, default=32)
    p.add_argument("--verify", type=int, default=16)
    p.add_argument("--kv-cache-gb", default=None,
                   help="the fast engine's KV cache for every size: GB, auto or full (default: the commands', auto)")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "grail_pipeline"]
    kv = [] if args.kv_cache_gb is None else ["--kv-cache-gb", args.kv_cache_gb]
    common = [*kv, "--model", args.model, "--engine", "fast", "--device", "cuda", "--memory-gb", f"{args.memory_gb:g}"]
    calibration = out / "calibration_24gb.yaml"
    calibrate = [*cli, "calibrate", *common, "--headroom-gb", f"{args.headroom_gb:g}", "--batch-sizes",
                 args.batch_sizes, "--calibration", str(calibration),
                 *([] if args.calibrate_problems is None else ["--num-problems", str(args.calibrate_problems)])]
    calibrate_s = run(calibrate)
    entries = yaml.safe_load(calibration.read_text())["calibrations"]
    (gpu, engines), = entries.items()
    entry = engines["fast"]
    chosen = entry["chosen"]
    report_path = out / "benchmark_24gb.json"
    budget = args.memory_gb - args.headroom_gb
    # the benchmark runs under the calibrated budget's cap: what calibrate chose must run there as well
    benchmark = [*cli, "benchmark", *common[:-1], f"{budget:g}", "--batch-sizes", str(chosen["batch_size"]), "--num-problems",
                 str(args.benchmark_problems), "--verify", str(args.verify), "--json", str(report_path)]
    benchmark_s = run(benchmark)
    report = json.loads(report_path.read_text())
    (row,) = report["results"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    summary = dict(
        kind="memory-24gb", created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), commit=commit or None,
        device=gpu, cap_gb=args.memory_gb, headroom_gb=args.headroom_gb, budget_gb=budget,
        commands=[" ".join(calibrate), " ".join(benchmark)],
        seconds=dict(calibrate=round(calibrate_s, 1), benchmark=round(benchmark_s, 1)),
        calibration_rows=entry["rows"],
        chosen=dict(batch_size=chosen["batch_size"], max_prompt_tokens=entry["workload"]["max_prompt_tokens"],
                    kv_cache_gb=entry["workload"]["kv_cache_gb"],
                    max_new_tokens=entry["workload"]["max_new_tokens"], length_profile=entry["workload"]["length_profile"],
                    calibrate_peak_gb=chosen["peak_gb"]),
        benchmark=dict(status=row["status"], rollouts_per_s=row["rollouts_per_s"], problems=row["problems"],
                       peak_reserved_gb=row["gpu_reserved_gb"], peak_process_gb=row["gpu_process_gb"],
                       within_budget=max(row["gpu_reserved_gb"], row["gpu_process_gb"] or 0) <= budget, verify=row["verify"],
                       breakdown=row["memory"]),
        environment=report["environment"],
    )
    path = out / f"memory_24gb_{time.strftime('%Y-%m-%d')}.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: summary[k] for k in ("device", "chosen", "benchmark")}, indent=2, default=str)[:4000])
    print(f"written {path}")


if __name__ == "__main__":
    main()
