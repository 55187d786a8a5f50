"""Old vs new code on a GPU: the same tokens, proofs, graph count; memory and step time. Usage: gpu_check.py ROOT OUT."""
import os
import random
import sys
import threading
import time

root, out = os.path.abspath(sys.argv[1]), sys.argv[2]
sys.path.insert(0, root)
import torch  # noqa: E402

import grail_pipeline  # noqa: E402

assert grail_pipeline.__file__.startswith(root), grail_pipeline.__file__
from grail_pipeline.inference.engine import GroupRequest, SamplingParams  # noqa: E402
from grail_pipeline.inference.fast_engine import FastEngine  # noqa: E402
from grail_pipeline.inference.loading import load_model  # noqa: E402
from grail_pipeline.proving.prefix import PrefixProver  # noqa: E402

try:
    from grail_pipeline.proving.proofs import ProofJob
    from grail_pipeline.proving.reference import ReferenceProver
except ImportError:
    from grail_pipeline.proving.provers import ProofJob, ReferenceProver

MODEL = os.environ.get("MODEL", "dummy:qwen2.5-0.5b")
SLOTS = int(os.environ.get("SLOTS", "128"))
MAX_NEW = 96
loaded = load_model(MODEL, "cuda")
sampling = SamplingParams(eos_token_id=151645, pad_token_id=151643, max_new_tokens=MAX_NEW)


def requests(n: int, group: int, seed: int) -> list[GroupRequest]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = [rng.randrange(150000) for _ in range(rng.randint(20, 500))]
        targets = [rng.choice([None, rng.randint(2, MAX_NEW + 10)]) for _ in range(group)]
        out.append(GroupRequest(f"{seed}-{i}", prompt, targets))
    return out


def graphs(engine) -> int:
    r = engine.runner
    if hasattr(r, "_prefill_graphs"):
        return len(r._prefill_graphs) + (engine._graph.graph is not None)
    return len(r._prefill_inputs) + ("step" in r.graphs)


report = {}
torch.cuda.synchronize()
reserved0, allocated0 = torch.cuda.memory_reserved(), torch.cuda.memory_allocated()
torch.manual_seed(0)
t0 = time.perf_counter()
engine = FastEngine(loaded, sampling, slots=SLOTS, max_prompt_tokens=512)
torch.cuda.synchronize()
report["startup_s"] = time.perf_counter() - t0
report["engine_reserved_mb"] = (torch.cuda.memory_reserved() - reserved0) / 2**20
report["engine_allocated_mb"] = (torch.cuda.memory_allocated() - allocated0) / 2**20
report["graphs_at_start"] = graphs(engine)

torch.manual_seed(1)
t0 = time.perf_counter()
results = engine.generate(requests(24, 16, seed=1))
torch.cuda.synchronize()
report["generate_s"] = time.perf_counter() - t0
report["stats"] = engine.stats.as_dict()
tokens = {r.request.key: r.completions for r in results}

# a group size met first mid-run (its prefill graphs captured lazily, thread_local) while another thread proves
jobs = [ProofJob(r.request.prompt_ids, r.completions[:6], "ab" * 32) for r in results[:4]]
prover = PrefixProver(loaded, max_length=512 + MAX_NEW)
stop = threading.Event()
proved = []


def prove_loop() -> None:
    while not stop.is_set():
        proved.append(prover.prove_many(jobs[:1]))


thread = threading.Thread(target=prove_loop)
thread.start()
torch.manual_seed(2)
more = engine.generate(requests(6, 8, seed=2))
stop.set()
thread.join()
report["proofs_during_lazy_capture"] = len(proved)
report["graphs_after_lazy"] = graphs(engine)
tokens.update({r.request.key: r.completions for r in more})

# step time: replays of the step alone
step = engine._graph if hasattr(engine, "_graph") else engine.runner.step
for _ in range(10):
    step()
torch.cuda.synchronize()
t0 = time.perf_counter()
for _ in range(200):
    step()
torch.cuda.synchronize()
report["step_ms"] = (time.perf_counter() - t0) / 200 * 1000
report["peak_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20

proofs = prover.prove_many(jobs)
reference = ReferenceProver(loaded).prove_many(jobs)
equal = total = 0
for pg, rg in zip(proofs, reference):
    for p, r in zip(pg, rg):
        equal += int((p.sketches == r.sketches).sum())
        total += len(r.sketches)
report["prefix_vs_reference_sketches_equal"] = f"{equal}/{total}"
report["inexact_lengths"] = len(prover.invariance.inexact_lengths)
torch.save(dict(report=report, tokens=tokens, exact=prover.invariance.exact,
                proofs=[[(p.sketches, p.indices, p.token_logprobs) for p in g] for g in proofs]), out)
print(root, report, flush=True)
