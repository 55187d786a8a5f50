"""Fast engine against the reference method (hf) on W1, side by side in one process on one GPU.

Both engines run the same pipeline (full proofs, signatures, re-verification of a sample with the
validator's method) on the same problems through `grail_pipeline.tools.measurement.measure_batch_size`; the
model is loaded once. Writes `fast_vs_hf_<gpu>_<date>.json` (to --out) with both engines' rows, the
ratio of the best rates, the measured copy bandwidth and the decode roofline it implies.

    python bench/fast_vs_hf.py --out bench/results
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from grail_pipeline.mining.runtime import Runtime
from grail_pipeline.mining.workload import benchmark_window
from grail_pipeline.protocol.wallet import load_signer
from grail_pipeline.tools.benchmark_report import environment
from grail_pipeline.tools.measurement import measure_batch_size
from grail_pipeline.tools.projection import WindowSpec


def kv_bytes_per_token(config) -> int:
    """layers × (K, V) × kv heads × head dim × bf16, from the model's config (any family)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * 2


def copy_bandwidth_tb_s() -> float:
    """Device-to-device copy rate, bytes read plus written (the method's memory ceiling)."""
    a = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        b.copy_(a)
    end.record()
    torch.cuda.synchronize()
    return 10 * 2 * a.numel() / (start.elapsed_time(end) / 1000) / 1e12


def roofline(row: dict, weight_bytes: int, kv_per_token: int, bandwidth: float) -> dict:
    """Tokens/s if a decode step only had to move the weights and the live KV at the measured bandwidth."""
    engine = row["engine"]
    occupied = engine.get("batch_occupancy", 0) * row["batch_size"]
    kv = occupied * engine.get("mean_context", 0) * kv_per_token
    step_s = (weight_bytes + kv) / (bandwidth * 1e12)
    return dict(occupied_slots=occupied, kv_gb_per_step=kv / 1e9, weights_gb=weight_bytes / 1e9,
                bound_step_ms=1000 * step_s, bound_tokens_per_s=occupied / step_s if step_s else 0.0,
                measured_step_ms=engine.get("step_ms", 0))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="dummy:qwen2.5-3b")
    p.add_argument("--fast-batch-sizes", default="256,512")
    p.add_argument("--fast-problems", type=int, default=128)
    p.add_argument("--fast-warmup", type=int, default=8)
    p.add_argument("--hf-batch-sizes", default="16")
    p.add_argument("--hf-problems", type=int, default=2)
    p.add_argument("--hf-warmup", type=int, default=1)
    p.add_argument("--verify", type=int, default=64, help="rollouts re-verified per fast batch size")
    p.add_argument("--hf-verify", type=int, default=16)
    p.add_argument("--max-prompt-tokens", type=int, default=384)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args()

    ns = argparse.Namespace(model=args.model, engine="fast", device="cuda", max_new_tokens=1024,
                            length_profile=None, max_prompt_tokens=args.max_prompt_tokens)
    t0 = time.perf_counter()
    runtime = Runtime.from_args(ns)
    load_s = time.perf_counter() - t0
    signer = load_signer(required=False)
    window = benchmark_window(args.seed)
    bandwidth = copy_bandwidth_tb_s()
    weight_bytes = sum(p.numel() * p.element_size() for p in runtime.loaded.model.parameters())
    rows: dict[str, list[dict]] = {"fast": [], "hf": []}
    plan = [("fast", args.fast_batch_sizes, args.fast_problems, args.fast_warmup, args.verify),
            ("hf", args.hf_batch_sizes, args.hf_problems, args.hf_warmup, args.hf_verify)]
    try:
        for engine, sizes, problems, warmup, verify in plan:
            runtime.engine_kind = engine
            for size in (int(s) for s in sizes.split(",") if s):
                result = measure_batch_size(runtime, signer, size, problems, warmup, window, verify, progress=None)
                row = dict(engine_kind=engine, **result.as_dict())
                if engine == "fast" and result.ok:
                    row["roofline"] = roofline(row, weight_bytes, kv_bytes_per_token(runtime.loaded.model.config), bandwidth)
                rows[engine].append(row)
                print(json.dumps(row, default=str), flush=True)
                print(f"{engine} batch {size}: {result.status} {result.rollouts_per_s:.2f} roll/s, "
                      f"{result.tokens_per_s:.0f} tok/s, peak {result.gpu_reserved_gb:.1f} GB reserved "
                      f"({result.gpu_process_gb} GB process), start-up {result.startup_seconds:.1f} s, "
                      f"stages {result.stage_seconds}, engine {result.engine}, verify {result.verify}", flush=True)
    finally:
        runtime.close()  # the fast engine's signing worker processes

    def best(engine: str) -> dict | None:
        ok = [r for r in rows[engine] if r["status"] == "ok" and r["rollouts"]]
        return max(ok, key=lambda r: r["rollouts_per_s"]) if ok else None

    bf, bh = best("fast"), best("hf")
    spec = WindowSpec()
    report = dict(
        kind="grail-pipeline-fast-vs-hf", created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        command="python bench/fast_vs_hf.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                                                         if k != "out"),
        environment=environment(), workload=dict(model=args.model, length_profile=runtime.lengths.spec,
                                                 max_new_tokens=1024, seed=args.seed),
        model_load_s=load_s, copy_bandwidth_tb_s=bandwidth, weight_gb=weight_bytes / 1e9,
        fast=rows["fast"], hf=rows["hf"],
        best_fast=None if bf is None else dict(batch_size=bf["batch_size"], rollouts_per_s=bf["rollouts_per_s"]),
        best_hf=None if bh is None else dict(batch_size=bh["batch_size"], rollouts_per_s=bh["rollouts_per_s"]),
        ratio=(bf["rollouts_per_s"] / bh["rollouts_per_s"]) if bf and bh else None,
        cap_rate=spec.cap_rate(),
    )
    gpu = torch.cuda.get_device_name().replace(" ", "-").replace("/", "-")
    path = Path(args.out) / f"fast_vs_hf_{gpu}_{time.strftime('%Y-%m-%d')}.json"
    path.write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {path}")
    if bf and bh:
        print(f"BEST fast {bf['rollouts_per_s']:.2f} roll/s (batch {bf['batch_size']}) vs hf {bh['rollouts_per_s']:.3f} "
              f"(batch {bh['batch_size']}): {report['ratio']:.1f}x")


if __name__ == "__main__":
    main()
