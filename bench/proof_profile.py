"""Where a prover's time goes on the GPU: kernel time by operator, and host time to queue the work.

Runs each prover on W1-shaped groups (as proof_exactness.py builds them) under torch.profiler and
prints the top operators by device time, the total device time and the wall time per rollout.

    python bench/proof_profile.py --groups 8
"""

from __future__ import annotations

import argparse
import time

import torch
from proof_exactness import jobs_for  # bench scripts run with bench/ on the path
from torch.profiler import ProfilerActivity, profile

from grail_pipeline.inference.loading import load_model
from grail_pipeline.proving.batched import BatchedProver
from grail_pipeline.proving.prefix import PrefixProver


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--rows", type=int, default=25)
    args = p.parse_args()
    loaded = load_model("dummy:qwen2.5-3b", "cuda")
    jobs = jobs_for(args.groups, seed=11)
    rollouts = sum(len(j.completions) for j in jobs)
    for name, prover in (("prefix", PrefixProver(loaded, max_length=384 + 1024)), ("batched", BatchedProver(loaded))):
        prover.prove_many(jobs[:2])
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            prover.prove_many(jobs)
            torch.cuda.synchronize()
            wall = time.perf_counter() - t0
        events = prof.key_averages()
        device_us = sum(e.self_device_time_total for e in events)
        print(f"== {name}: wall {1000 * wall / rollouts:.2f} ms/rollout (profiled), "
              f"device {device_us / 1000 / rollouts:.2f} ms/rollout", flush=True)
        print(events.table(sort_by="self_device_time_total", row_limit=args.rows, max_name_column_width=60), flush=True)


if __name__ == "__main__":
    main()
