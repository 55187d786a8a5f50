"""Do `eager_fused`'s kernels give PyTorch eager's bits, and what do they save? (GPU; the prover's element-wise ops)

Per kernel, against the eager ops transformers runs (bits compared, no tolerance): RMSNorm on W1's hidden rows
and on Qwen3's per-head q/k rows at several scales; the rotary embedding with the model's own cos/sin tables
over positions 0..N-1. Then each op's device time at W1's shapes (N rows), eager against fused, and the prefix
prover on W1-shaped groups with the kernels and without: proofs compared bit for bit, and the fused prover's
sketches against the validator's forward (proof_exactness.py's comparison), with milliseconds per rollout for
both. A diagnostic: that forward runs in this process on the same model object; a proof counts as the
validator's only through `fast_vs_hf.py`'s check in a fresh process that loads the checkpoint directory.
Last, the SiLU of SiLU·up over every finite bf16 input, with a sample of the inputs where it differs (none,
H200, 2026-12-03). The JSON is rewritten after each part.

    python bench/eager_fused_probe.py --rows 8192 --groups 8
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from pipeline_profile import time_graph
from proof_exactness import compare, jobs_for, reference_hidden
from transformers.activations import ACT2FN
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm, apply_rotary_pos_emb
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from grail_pipeline.inference.loading import load_model
from grail_pipeline.inference.models import eager_fused
from grail_pipeline.inference.models.decoder import Dims, rotary_tables
from grail_pipeline.proving.prefix import PrefixProver

DEVICE = "cuda"  # --device cpu rehearses the script (the kernels then run only under TRITON_INTERPRET=1)


def differing(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a.view(torch.int16) != b.view(torch.int16)).sum())


def silu_domain() -> dict:
    """eager_fused's SiLU·up with up = 1 (exact) against torch's silu over every finite bf16 input; the inputs
    where they differ."""
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).to(DEVICE)
    gate = every[torch.isfinite(every.float())].contiguous()
    act = ACT2FN["silu"]
    got = eager_fused.silu_mul(act, gate, torch.ones_like(gate))
    expected = act(gate)
    bad = (got.view(torch.int16) != expected.view(torch.int16)).nonzero().flatten()
    sample = bad[torch.linspace(0, len(bad) - 1, min(len(bad), 60)).long()] if len(bad) else bad
    return dict(values=len(gate), differing=len(bad),
                differing_inputs=[float(v) for v in gate[sample].float().cpu()],
                kernel_outputs=[float(v) for v in got[sample].float().cpu()],
                torch_outputs=[float(v) for v in expected[sample].float().cpu()])


def norms(rows: int) -> dict:
    out = {}
    g = torch.Generator(device=DEVICE).manual_seed(1)
    for name, module, shape in (("qwen2_hidden_2048", Qwen2RMSNorm(2048, eps=1e-6), (rows, 2048)),
                                ("qwen3_hidden_2560", Qwen3RMSNorm(2560, eps=1e-6), (rows, 2560)),
                                ("qwen3_qk_heads", Qwen3RMSNorm(128, eps=1e-6), (rows, 32, 128))):
        module = module.to(DEVICE).bfloat16()
        with torch.no_grad():
            module.weight.copy_(torch.randn(module.weight.shape, device=DEVICE, generator=g) * 0.5 + 1)
        bad = 0
        for scale in (1e-3, 0.1, 1.0, 30.0, 3000.0):
            x = (torch.randn(shape, device=DEVICE, generator=g) * scale).bfloat16()
            bad += differing(eager_fused.rms_norm(module, x), module(x))
        out[name] = dict(elements=5 * int(torch.Size(shape).numel()), differing=bad)
    return out


def rotary(decoder, rows: int, dtype) -> dict:
    """The model's own cos/sin tables over positions 0..rows-1, q and k at three scales."""
    dims = Dims.of(decoder.config)
    cos, sin = rotary_tables(decoder, rows, dtype, torch.device(DEVICE))
    g = torch.Generator(device=DEVICE).manual_seed(2)
    bad = 0
    for scale in (0.01, 1.0, 100.0):
        q = (torch.randn(rows, dims.heads, dims.head_dim, device=DEVICE, generator=g) * scale).to(dtype)
        k = (torch.randn(rows, dims.kv_heads, dims.head_dim, device=DEVICE, generator=g) * scale).to(dtype)
        (fq, fk), (eq, ek) = eager_fused.rotary(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin)
        bad += differing(fq, eq) + differing(fk, ek)
    return dict(elements=3 * rows * (dims.heads + dims.kv_heads) * dims.head_dim, differing=bad)


def timings(decoder, rows: int) -> dict | None:
    """Eager and fused device ms at W1's shapes (layer 0's modules of the loaded model); None off the GPU."""
    if DEVICE != "cuda":
        return None
    layer = decoder.layers[0]
    dims = Dims.of(decoder.config)
    x = torch.randn(rows, decoder.config.hidden_size, device=DEVICE).bfloat16()
    q = torch.randn(rows, dims.heads, dims.head_dim, device=DEVICE).bfloat16()
    k = torch.randn(rows, dims.kv_heads, dims.head_dim, device=DEVICE).bfloat16()
    cos, sin = rotary_tables(decoder, rows, torch.bfloat16, torch.device(DEVICE))
    norm = layer.input_layernorm
    gate = torch.randn(rows, decoder.config.intermediate_size, device=DEVICE).bfloat16()
    up = torch.randn_like(gate)
    act = layer.mlp.act_fn
    pairs = dict(rms_norm=(lambda: norm(x), lambda: eager_fused.rms_norm(norm, x)),
                 rotary=(lambda: apply_rotary_pos_emb(q, k, cos, sin), lambda: eager_fused.rotary(q, k, cos, sin)),
                 silu_mul=(lambda: act(gate) * up, lambda: eager_fused.silu_mul(act, gate, up)))
    out = {}
    for name, (eager, fused) in pairs.items():
        e, f = time_graph(eager), time_graph(fused)
        out[name] = dict(eager_ms=round(e, 4), fused_ms=round(f, 4), saved_ms=round(e - f, 4))
    # per layer the prover runs two norms, one rotary embedding and one SiLU·up; the final norm once
    per_layer = 2 * out["rms_norm"]["saved_ms"] + out["rotary"]["saved_ms"] + out["silu_mul"]["saved_ms"]
    out["saved_ms_per_row_all_layers"] = per_layer * len(decoder.layers) / rows
    return out


def provers(loaded, groups: int) -> dict:
    jobs = jobs_for(groups, seed=11)
    fused = PrefixProver(loaded, max_length=384 + 1024, fused_elementwise=True)
    eager = PrefixProver(loaded, max_length=384 + 1024, invariance=fused.invariance, fused_elementwise=False)
    out: dict = {}
    proofs = {}
    for name, prover in (("eager", eager), ("fused", fused)):
        prover.prove_many(jobs[:1])  # warm
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            proofs[name] = prover.prove_many(jobs)  # the proofs are read back: the device is done
            times.append(time.perf_counter() - t0)
        rollouts = sum(len(j.completions) for j in jobs)
        out[name] = dict(ms_per_rollout=round(1000 * min(times) / rollouts, 3), rollouts=rollouts)
    same = all(torch.equal(a.sketches, b.sketches) and torch.equal(a.indices, b.indices)
               and a.token_logprobs == b.token_logprobs
               for ga, gb in zip(proofs["eager"], proofs["fused"]) for a, b in zip(ga, gb))
    out["fused_proofs_equal_eager"] = same
    out["fused_vs_validator"] = compare(reference_hidden(loaded.model, jobs), jobs, proofs["fused"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=8192)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--models", default="dummy:qwen2.5-3b", help="comma list: the prover check on each")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args()
    global DEVICE
    DEVICE = args.device
    gpu = torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE
    report: dict = dict(kind="grail-pipeline-eager-fused-probe", created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        gpu=gpu, torch=torch.__version__, rows=args.rows)
    path = os.path.join(args.out, "eager_fused_probe.json")

    def save(key: str, value) -> None:  # after each part: a run cut short still leaves what it measured
        report[key] = value
        print(key, json.dumps(value), flush=True)
        with open(path, "w") as fh:
            json.dump(report, fh, indent=1)

    save("rms_norm", norms(args.rows))
    for model in args.models.split(","):
        loaded = load_model(model, DEVICE)
        decoder = loaded.model.get_decoder()
        save(f"{model} rotary", rotary(decoder, args.rows, loaded.dtype))
        save(f"{model} timings", timings(decoder, args.rows))
        save(f"{model} provers", provers(loaded, args.groups))
        del loaded, decoder
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    save("silu", silu_domain())
    print("wrote", path)


if __name__ == "__main__":
    main()
