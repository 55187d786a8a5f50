"""Which sequence lengths does batching change, bit for bit, on this GPU and software stack?

The validator recomputes each rollout alone (one sequence of length L). A batched proof forward gives the
same bits only where every kernel computes a row the same way in both shapes. This scans L over the W1
range for the model's GEMM shapes (one sequence of L rows versus the same rows inside a 16k-row batch)
and for causal SDPA (alone versus right-padded in a batch of 4), and times a sync-free one-rollout-per-
forward proof pass.

    python bench/batch_invariance.py
"""

from __future__ import annotations

import json
import os
import time

import torch
import torch.nn.functional as F

from grail_pipeline.inference.loading import load_model


def gemm_scan(weights: dict[str, torch.Tensor], lengths: range) -> dict[str, list[int]]:
    """Lengths L at which rows of x[:L] @ W.T differ from the same rows computed in a big batch."""
    out: dict[str, list[int]] = {}
    for name, w in weights.items():
        big = torch.randn(16384, w.shape[1], device="cuda", dtype=torch.bfloat16)
        full = F.linear(big, w)
        bad = [n for n in lengths if not torch.equal(F.linear(big[:n], w), full[:n])]
        out[name] = bad
    return out


def sdpa_scan(lengths: range, width: int = 1400) -> list[int]:
    # [B, L, H, D] transposed to [B, H, L, D], the layout transformers hands to SDPA
    q = torch.randn(4, width, 16, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(4, width, 2, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(4, width, 2, 128, device="cuda", dtype=torch.bfloat16)

    def attend(a, b, c):
        return F.scaled_dot_product_attention(a.transpose(1, 2), b.transpose(1, 2), c.transpose(1, 2),
                                              is_causal=True, enable_gqa=True)

    batched = attend(q, k, v)
    bad = []
    for n in lengths:
        alone = attend(q[:1, :n].contiguous(), k[:1, :n].contiguous(), v[:1, :n].contiguous())
        if not torch.equal(alone[0], batched[0, :, :n]):
            bad.append(n)
    return bad


def unbatched_forward_ms(loaded, lengths: list[int]) -> float:
    decoder = loaded.model.get_decoder()
    ids = [torch.randint(0, 150000, (1, n), device="cuda") for n in lengths]
    with torch.inference_mode():
        for x in ids[:2]:
            decoder(input_ids=x)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for x in ids:
            decoder(input_ids=x)
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - t0) / len(ids)


def main() -> None:
    loaded = load_model("dummy:qwen2.5-3b", "cuda")
    layer = loaded.model.get_decoder().layers[0]
    weights = {"q": layer.self_attn.q_proj.weight, "k": layer.self_attn.k_proj.weight,
               "o": layer.self_attn.o_proj.weight, "gate": layer.mlp.gate_proj.weight,
               "down": layer.mlp.down_proj.weight}
    lengths = range(300, 1320)
    report: dict = {}
    with torch.inference_mode():
        t0 = time.perf_counter()
        report["gemm_bad_lengths"] = gemm_scan(weights, lengths)
        report["sdpa_bad_lengths"] = sdpa_scan(lengths)
        report["scan_s"] = time.perf_counter() - t0
    report["unbatched_forward_ms"] = {n: unbatched_forward_ms(loaded, [n] * 8) for n in (400, 700, 1000, 1300)}
    print(json.dumps({k: (v if not isinstance(v, dict) else {a: (b if not isinstance(b, list) else
                      f"{len(b)} bad: {b[:20]}") for a, b in v.items()}) for k, v in report.items()}))
    with open(os.path.join(os.environ.get("OUT", "."), "batch_invariance.json"), "w") as fh:
        json.dump(report, fh)


if __name__ == "__main__":
    main()
