"""One-call GPU probe of the fast path's parts on W1 shapes (dummy Qwen2.5-3B, random prompts).

Checks and times, in one device call: the Triton decode attention against SDPA, the batched prover
against the validator's unbatched forward (bitwise and by the v1 tolerance), the fast engine's decode
step at several slot counts, and one group through the HF reference engine. Prints a table last and
writes JSON to $OUT (or ./probe.json).

    python bench/gpu_probe.py --slots 256,512 --groups 48
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from grail_pipeline.inference.decode_attention import decode_attention_reference, decode_attention_triton
from grail_pipeline.inference.engine import GroupRequest, SamplingParams
from grail_pipeline.inference.fast_engine import FastEngine
from grail_pipeline.inference.hf_engine import HFEngine
from grail_pipeline.inference.kv_cache import PAGE
from grail_pipeline.inference.loading import load_model
from grail_pipeline.mining.lengths import W1_SPEC, parse_length_profile
from grail_pipeline.protocol.profile import PROFILE
from grail_pipeline.protocol.sketches import r_vec, sketch_at_indices, sketch_distance
from grail_pipeline.proving.batched import BatchedProver
from grail_pipeline.proving.reference import ReferenceProver
from grail_pipeline.proving.validator import validator_forward
from grail_pipeline.tools.roofline import timed_ms

EOS, PAD = 151645, 151643


def requests(n: int, prompt_len: int, seed0: int = 0) -> list[GroupRequest]:
    lengths = parse_length_profile(W1_SPEC)
    g = torch.Generator().manual_seed(seed0)
    out = []
    for i in range(n):
        prompt = torch.randint(0, 151000, (prompt_len,), generator=g).tolist()
        out.append(GroupRequest(key=i, prompt_ids=prompt, targets=lengths.targets(seed0 + i, 16)))
    return out


def check_attention(report: dict) -> None:
    """The Triton decode attention against SDPA over the paged cache, W1's shapes (16 query heads, 2 KV heads of
    128) and contexts (270..1,000): each slot's pages its own ("private"), and each group of 16 slots sharing its
    prompt's first 4 pages as the engine's groups do ("shared": whether the GPU's L2 serves the repeats)."""
    torch.manual_seed(0)
    rows = []
    for slots, t in ((64, 1536), (512, 1536)):
        per_slot = t // PAGE
        pages = slots * per_slot + 1
        q = torch.randn(slots, 16, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(pages, PAGE, 2, 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(pages, PAGE, 2, 128, device="cuda", dtype=torch.bfloat16)
        private = (1 + torch.randperm(pages - 1, device="cuda")).view(slots, per_slot).to(torch.int32)  # shuffled
        shared = private.clone()
        shared[:, :4] = private[torch.arange(slots, device="cuda") // 16 * 16, :4]  # a group's first slot's pages
        lens = torch.randint(270, 1000, (slots,), device="cuda", dtype=torch.int32)
        row = dict(slots=slots)
        for name, table in (("private", private), ("shared", shared)):
            ref = decode_attention_reference(q.float(), k.float(), v.float(), table, lens)
            out = decode_attention_triton(q, k, v, table, lens)
            row[f"{name}_rel_err"] = ((out.float() - ref).norm() / ref.norm()).item()
            row[f"{name}_triton_ms"] = timed_ms(lambda t=table: decode_attention_triton(q, k, v, t, lens))
        row["sdpa_ms"] = timed_ms(lambda: decode_attention_reference(q, k, v, private, lens))
        live = (lens.sum().item() * 2 * 2 * 128 * 2) / 1e9
        row.update(live_gb=live, private_tb_s=live / row["private_triton_ms"])
        rows.append(row)
    report["attention"] = rows


def check_prover(loaded, report: dict, groups: int) -> None:
    rand = "ab" * 32
    r = r_vec(rand).to(loaded.device)
    batched, reference = BatchedProver(loaded), ReferenceProver(loaded)
    rows = []
    for req in requests(groups, 280, seed0=100):
        comps = [torch.randint(0, 151000, (t,)).tolist()[:-1] + [EOS] for t in req.targets]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        proofs = batched.prove(req.prompt_ids, comps, rand)
        torch.cuda.synchronize()
        t_batched = time.perf_counter() - t0
        t0 = time.perf_counter()
        ref_proofs = reference.prove(req.prompt_ids, comps, rand)
        t_ref = time.perf_counter() - t0
        positions = passed = bit_equal = lp_ok = lp_n = 0
        for comp, proof, refp in zip(comps, proofs, ref_proofs):
            tokens = req.prompt_ids + comp
            hidden, logits = validator_forward(loaded.model, tokens)
            own = sketch_at_indices(hidden, proof.indices.to(loaded.device), r).cpu()
            dist = sketch_distance(own, proof.sketches)
            tol = torch.tensor([PROFILE.sketch_tolerance_at(p) for p in range(len(tokens))])
            positions += len(tokens)
            passed += int((dist <= tol).sum())
            bit_equal += int((proof.sketches == refp.sketches).sum())
            p = len(req.prompt_ids)
            lp = torch.log_softmax(logits[p - 1:-1].float(), -1).gather(1, torch.tensor(comp, device=logits.device)[:, None]).squeeze(1).cpu()
            mine = torch.tensor(proof.token_logprobs[p:])
            ok = ((mine - lp).abs() <= 1e-3) | ((mine - lp).abs() <= 0.02 * lp.abs())
            lp_ok += int(ok.sum())
            lp_n += len(comp)
        rows.append(dict(positions=positions, sketch_pass=passed / positions, sketch_equal_ref=bit_equal / positions,
                         logprob_pass=lp_ok / lp_n, batched_s=t_batched, reference_s=t_ref))
    report["prover"] = rows
    report["prover_parts"] = prover_parts(loaded, batched, comps, req.prompt_ids, r)


def prover_parts(loaded, prover, comps, prompt, r) -> dict:
    """Milliseconds of the batched prover's parts on one group (forward, sketches, logprobs)."""
    from grail_pipeline.protocol.sketches import sketch_hidden
    seqs = [prompt + c for c in comps]
    out = {}
    for budget in (8192, 16384, 32768):
        prover.max_batch_tokens = budget
        batches = prover.batches([len(x) for x in seqs])
        padded = sum(len(b) * len(seqs[b[0]]) for b in batches)
        def fwd():
            for b in batches:
                width = len(seqs[b[0]])
                ids = torch.zeros((len(b), width), dtype=torch.long, device="cuda")
                prover.decoder(input_ids=ids)
        out[f"forward_ms_budget{budget}"] = timed_ms(fwd, reps=3)
        out[f"padding_waste_budget{budget}"] = 1 - sum(map(len, seqs)) / padded
    h = torch.randn(sum(map(len, seqs)), 2048, device="cuda", dtype=torch.bfloat16)
    out["sketch_ms"] = timed_ms(lambda: sketch_hidden(h, r), reps=3)
    n_comp = sum(map(len, comps))
    states = torch.randn(n_comp, 2048, device="cuda", dtype=torch.bfloat16)
    tgt = torch.randint(0, 151000, (n_comp,), device="cuda")
    def lp():
        for s0 in range(0, n_comp, prover.logit_chunk):
            logits = prover.lm_head(states[s0:s0 + prover.logit_chunk]).float()
            logits.gather(1, tgt[s0:s0 + prover.logit_chunk, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
    out["logprob_ms"] = timed_ms(lp, reps=3)
    out["tokens"] = sum(map(len, seqs))
    return out


def probe_fast(loaded, report: dict, slot_list: list[int], groups: int) -> None:
    sampling = SamplingParams(eos_token_id=EOS, pad_token_id=PAD)
    rows = []
    for slots in slot_list:
        t0 = time.perf_counter()
        engine = FastEngine(loaded, sampling, slots=slots, max_prompt_tokens=512)
        startup = time.perf_counter() - t0
        step_ms = timed_ms(engine.runner.step, reps=50)
        engine.generate(requests(slots // 16, 280, seed0=7))  # warm run: fill and drain once
        engine.reset_stats()
        reqs = requests(groups, 280, seed0=1000)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        results = engine.generate(reqs)
        wall = time.perf_counter() - t0
        ok = all(len(c) == t for r in results for c, t in zip(r.completions, r.request.targets))
        st = engine.stats.as_dict()
        rows.append(dict(slots=slots, startup_s=startup, graph_step_ms=step_ms, wall_s=wall,
                         rollouts_per_s=16 * groups / wall, tokens_per_s=st["generated_tokens"] / wall,
                         lengths_ok=ok, **st))
        del engine
        torch.cuda.empty_cache()
    report["fast"] = rows


def probe_hf(loaded, report: dict) -> None:
    sampling = SamplingParams(eos_token_id=EOS, pad_token_id=PAD)
    engine = HFEngine(loaded, sampling, batch_size=16)
    engine.generate(requests(1, 280, seed0=5)[:1])
    engine.reset_stats()
    t0 = time.perf_counter()
    engine.generate(requests(1, 280, seed0=6))
    wall = time.perf_counter() - t0
    report["hf"] = dict(batch=16, wall_s=wall, rollouts_per_s=16 / wall, **engine.stats.as_dict())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slots", default="256,512")
    parser.add_argument("--groups", type=int, default=48)
    parser.add_argument("--prover-groups", type=int, default=2)
    parser.add_argument("--skip", default="")
    args = parser.parse_args()
    skip = set(args.skip.split(","))
    report: dict = dict(torch=torch.__version__, gpu=torch.cuda.get_device_name())
    loaded = load_model("dummy:qwen2.5-3b", "cuda")
    for name, fn in (("attention", lambda: check_attention(report)),
                     ("prover", lambda: check_prover(loaded, report, args.prover_groups)),
                     ("fast", lambda: probe_fast(loaded, report, [int(s) for s in args.slots.split(",")], args.groups)),
                     ("hf", lambda: probe_hf(loaded, report))):
        if name in skip:
            continue
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as exc:  # a probe reports every part it can
            report[name] = f"FAILED: {type(exc).__name__}: {exc}"
        print(f"== {name} ({time.perf_counter() - t0:.1f}s): {json.dumps(report.get(name), default=str)}", flush=True)
    report["peak_reserved_gb"] = torch.cuda.max_memory_reserved() / 1e9
    path = os.path.join(os.environ.get("OUT", "."), "probe.json")
    with open(path, "w") as fh:
        json.dump(report, fh, indent=1, default=str)


if __name__ == "__main__":
    main()
