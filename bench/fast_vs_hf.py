"""Fast engine against the reference method (hf) on W1, side by side in one process on one GPU.

Both engines run the same pipeline (full proofs, signatures, re-verification of a sample with the
validator's method) on the same problems through `grail_pipeline.tools.measurement.measure_batch_size`; the
model is loaded once. Writes `fast_vs_hf_<gpu>_<date>.json` (to --out) with both engines' rows, the
ratio of the best rates, the card's measured ceilings and each fast row's bounds (tools/roofline.py).

    python bench/fast_vs_hf.py --out bench/results
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from grail_pipeline.cli.arguments import kv_cache_size
from grail_pipeline.mining.runtime import Runtime
from grail_pipeline.mining.workload import benchmark_window
from grail_pipeline.protocol.wallet import load_signer
from grail_pipeline.proving.prefix import PrefixProver
from grail_pipeline.tools.benchmark_report import environment
from grail_pipeline.tools.measurement import measure_batch_size
from grail_pipeline.tools.projection import WindowSpec
from grail_pipeline.tools.roofline import measured_ceilings, result_roofline


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
    p.add_argument("--kv-cache-gb", type=kv_cache_size, default=None,
                   help="the fast engine's KV cache: GB, auto or full (default: the commands', auto)")
    p.add_argument("--fast-attention", choices=("rows", "shared", "both"), default="rows",
                   help="the fast engine's decode attention: each row reads its pages (rows), a group's shared prompt "
                        "pages read once (shared: benchmark --shared-prompt-attention), or each size with both")
    p.add_argument("--prover-ops", choices=("eager", "fused", "both"), default="fused",
                   help="the prefix prover's norms, rotary embedding and SiLU·up: eager_fused's kernels (the "
                        "default, as the commands run them), PyTorch's eager ops, or each size with both")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args()

    ns = argparse.Namespace(model=args.model, engine="fast", device="cuda", max_new_tokens=1024,
                            length_profile=None, max_prompt_tokens=args.max_prompt_tokens, kv_cache_gb=args.kv_cache_gb)
    t0 = time.perf_counter()
    runtime = Runtime.from_args(ns)
    load_s = time.perf_counter() - t0
    signer = load_signer(required=False)
    window = benchmark_window(args.seed)
    ceilings = measured_ceilings(str(runtime.loaded.device))
    rows: dict[str, list[dict]] = {"fast": [], "hf": []}
    shared = {"rows": [False], "shared": [True], "both": [False, True]}[args.fast_attention]
    fused = {"fused": [True], "eager": [False], "both": [False, True]}[args.prover_ops]
    plan = [("fast", args.fast_batch_sizes, args.fast_problems, args.fast_warmup, args.verify, shared, fused),
            ("hf", args.hf_batch_sizes, args.hf_problems, args.hf_warmup, args.hf_verify, [False], [None])]
    try:
        for engine, sizes, problems, warmup, verify, attention, ops in plan:
            runtime.engine_kind = engine
            for size, shared_attention, fused_ops in ((int(s), a, f) for s in sizes.split(",") if s
                                                      for a in attention for f in ops):
                runtime.shared_prompt_attention = shared_attention
                prover = runtime.prover()
                if isinstance(prover, PrefixProver):
                    prover.fused_elementwise = fused_ops
                result = measure_batch_size(runtime, signer, size, problems, warmup, window, verify, progress=None)
                row = dict(engine_kind=engine, shared_prompt_attention=runtime.shared_prompt_attention,
                           fused_prover_ops=getattr(prover, "fused_elementwise", None), **result.as_dict())
                if engine == "fast" and result.ok:
                    row["roofline"] = result_roofline(runtime, result)
                rows[engine].append(row)
                print(json.dumps(row, default=str), flush=True)
                variant = (" shared" if runtime.shared_prompt_attention else "") + {True: " fused", False: " eager"}.get(
                    row["fused_prover_ops"], "")
                print(f"{engine} batch {size}{variant}: {result.status} {result.rollouts_per_s:.2f} roll/s, "
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
                                                         if k != "out" and v is not None),
        environment=environment(), workload=dict(model=args.model, length_profile=runtime.lengths.spec,
                                                 max_new_tokens=1024, seed=args.seed),
        model_load_s=load_s, ceilings=vars(ceilings) if ceilings else None,
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
