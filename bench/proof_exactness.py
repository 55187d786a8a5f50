"""Do the batched prover's sketches equal the validator's own, and does concurrent decoding change that?

For W1-shaped rollouts (real SAT prompts, random completions of W1 lengths) it compares, per position,
the prover's sketch with the sketch the validator computes from its own unbatched forward at the
prover's indices: exact equality and the v1 tolerance. Variants: pooled length-sorted batches, one
rollout per forward, the prompt once per group (PrefixProver), each alone and while the fast engine
decodes in another thread. (An earlier version of the batched prover, with batched projections, was
exact on 63 of 64 rollouts: see bench/NOTES.md.) Also checks, kernel by kernel, that bottom-right
causal attention of completion rows over a cached prompt gives the bits of full causal attention.

    python bench/proof_exactness.py --groups 4
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time

import torch

from grail_pipeline.inference.engine import GroupRequest, SamplingParams
from grail_pipeline.inference.fast_engine import FastEngine
from grail_pipeline.inference.loading import load_model
from grail_pipeline.mining.chain import WindowContext
from grail_pipeline.mining.lengths import W1_SPEC, parse_length_profile
from grail_pipeline.mining.messages import make_task
from grail_pipeline.protocol.profile import PROFILE
from grail_pipeline.protocol.sketches import r_vec, sketch_at_indices, sketch_distance
from grail_pipeline.protocol.tokenizer import builtin_tokenizer
from grail_pipeline.proving.batched import BatchedProver
from grail_pipeline.proving.prefix import PrefixProver
from grail_pipeline.proving.proofs import ProofJob
from grail_pipeline.proving.validator import validator_forward

EOS = 151645


def jobs_for(groups: int, seed: int) -> list[ProofJob]:
    tok = builtin_tokenizer()
    window = WindowContext(0, "0x" + "ab" * 32, "cd" * 32)
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(groups):
        task = make_task(window, seed + i, "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY", tok,
                         parse_length_profile(W1_SPEC))
        comps = [torch.randint(0, 151000, (t - 1,), generator=g).tolist() + [EOS] for t in task.targets]
        out.append(ProofJob(task.prompt_ids, comps, window.randomness))
    return out


def reference_hidden(model, jobs: list[ProofJob]) -> list[list[torch.Tensor]]:
    """The validator's last hidden states, computed once with nothing else on the GPU."""
    with torch.inference_mode():
        return [[validator_forward(model, list(job.prompt_ids) + list(c))[0] for c in job.completions]
                for job in jobs]


def compare(reference: list[list[torch.Tensor]], jobs: list[ProofJob], proofs) -> dict:
    device = reference[0][0].device
    r = r_vec(jobs[0].randomness_hex).to(device)
    equal = passed = total = rollouts_exact = 0
    failures = []
    for g, (ref_group, group, job) in enumerate(zip(reference, proofs, jobs)):
        for i, (hidden, proof) in enumerate(zip(ref_group, group)):
            own = sketch_at_indices(hidden, proof.indices.to(device), r).cpu()
            dist = sketch_distance(own, proof.sketches)
            tol = torch.tensor([PROFILE.sketch_tolerance_at(p) for p in range(len(own))])
            equal += int((dist == 0).sum())
            passed += int((dist <= tol).sum())
            total += len(own)
            rollouts_exact += int(bool((dist == 0).all()))
            bad = torch.nonzero(dist != 0).flatten().tolist()
            if bad:
                failures.append(dict(group=g, rollout=i, prompt=len(job.prompt_ids), length=len(own),
                                     positions_differing=len(bad), first=bad[0], last=bad[-1]))
    return dict(positions=total, exact=equal / total, within_tolerance=passed / total,
                rollouts_exact=rollouts_exact, rollouts=sum(len(j.completions) for j in jobs), failures=failures[:20])


def decode_in_background(loaded, stop: threading.Event) -> threading.Thread:
    engine = FastEngine(loaded, SamplingParams(eos_token_id=EOS, pad_token_id=151643), slots=256,
                        max_prompt_tokens=384)
    lengths = parse_length_profile(W1_SPEC)

    def work() -> None:
        n = 0
        while not stop.is_set():
            reqs = [GroupRequest(n + i, list(range(1000, 1280)), lengths.targets(n + i, 16)) for i in range(16)]
            engine.generate(reqs)
            n += 16

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread


def suffix_attention_scan(prompt_lengths=(220, 270, 301), completion_lengths=(1, 31, 64, 127, 128, 129, 400, 1024),
                          batch: int = 4) -> dict:
    """Rows of full causal attention (the validator's call) against the same rows as a suffix over cached keys."""
    from torch.nn.attention.bias import causal_lower_right

    report = {}
    for p in prompt_lengths:
        for c in completion_lengths:
            n = p + c
            q = torch.randn(batch, 16, n, 128, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(batch, 2, n, 128, device="cuda", dtype=torch.bfloat16)
            v = torch.randn(batch, 2, n, 128, device="cuda", dtype=torch.bfloat16)
            full = torch.nn.functional.scaled_dot_product_attention(q[:1], k[:1], v[:1], is_causal=True,
                                                                     enable_gqa=True)
            suffix = torch.nn.functional.scaled_dot_product_attention(
                q[:, :, p:], k, v, attn_mask=causal_lower_right(c, n), enable_gqa=True)
            report[f"{p}+{c}"] = bool(torch.equal(full[0, :, p:], suffix[0]))
    params = torch.backends.cuda.SDPAParams(q[:1], k[:1], v[:1], None, 0.0, True, True)
    report["flash_serves_validator_call"] = bool(torch.backends.cuda.can_use_flash_attention(params, True))
    return report


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--skip-concurrent", action="store_true", help="only the provers alone")
    p.add_argument("--skip-one-per-forward", action="store_true")
    args = p.parse_args()
    loaded = load_model("dummy:qwen2.5-3b", "cuda")
    jobs = jobs_for(args.groups, seed=11)
    reference = reference_hidden(loaded.model, jobs)
    report: dict = dict(suffix_attention=suffix_attention_scan())
    print("suffix attention", json.dumps(report["suffix_attention"]), flush=True)
    t0 = time.perf_counter()
    prefix = PrefixProver(loaded, max_length=384 + 1024)
    report["prefix_startup_s"] = time.perf_counter() - t0
    report["inexact_lengths"] = prefix.invariance.inexact_lengths
    print("inexact lengths", report["inexact_lengths"], "startup", report["prefix_startup_s"], flush=True)
    variants = {
        "prefix": prefix,
        "prefix_span_1": PrefixProver(loaded, max_length=384 + 1024, invariance=prefix.invariance, attention_span=1),
        "pooled_row_exact": BatchedProver(loaded),
        "one_per_forward": BatchedProver(loaded, max_batch_tokens=1),
    }
    report["sdpa"] = dict(flash=torch.backends.cuda.flash_sdp_enabled(), cudnn=torch.backends.cuda.cudnn_sdp_enabled(),
                          mem_efficient=torch.backends.cuda.mem_efficient_sdp_enabled())
    if args.skip_one_per_forward:
        del variants["one_per_forward"]
    for concurrent in (False,) if args.skip_concurrent else (False, True):
        stop = threading.Event()
        thread = decode_in_background(loaded, stop) if concurrent else None
        if concurrent:
            time.sleep(20)  # compile, capture, reach steady decoding
        for name, prover in variants.items():
            prover.prove_many(jobs[:1])  # warm
            torch.cuda.synchronize()
            t0, cpu = time.perf_counter(), time.thread_time()
            proofs = prover.prove_many(jobs)
            torch.cuda.synchronize()
            seconds, cpu = time.perf_counter() - t0, time.thread_time() - cpu
            key = f"{name}{'_while_decoding' if concurrent else ''}"
            rollouts = sum(len(j.completions) for j in jobs)
            report[key] = dict(seconds=seconds, ms_per_rollout=1000 * seconds / rollouts,
                               cpu_ms_per_rollout=1000 * cpu / rollouts,
                               **compare(reference, jobs, proofs))
            print(key, json.dumps(report[key]), flush=True)
        if thread is not None:
            stop.set()
            thread.join(timeout=120)
    with open(os.path.join(os.environ.get("OUT", "."), "proof_exactness.json"), "w") as fh:
        json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
