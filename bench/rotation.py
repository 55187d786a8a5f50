"""Checkpoint rotation on the GPU: from "checkpoint ready" to the first rollout on it, and the GPU time a switch costs.

W1's model (`dummy:qwen2.5-3b`) on the fast engine: a series of perturbed checkpoints is written
(`tools.checkpoint_series`, as `make-checkpoints` does), the engine starts on the first, and each next one
is switched to through the daemon's own path (`mining.rotation.CheckpointRotation.before_window`: the
checkpoint directory's choice, then the copy into the engine's tensors from host memory). Per switch it
records the copy (the GPU time lost: nothing else runs on the GPU meanwhile), the time from the checkpoint's
ready marker to its first group of 16 rollouts (as if its window opened the moment it became ready; in the
daemon a checkpoint waits for the next window to open), the peak GPU memory the copy added (no second copy of the
weights), and checks that the engine's tensors hold the checkpoint's numbers bit for bit. It asserts that
nothing was recompiled or recaptured (CUDA graph count and torch.compile's graph count unchanged) and that
the switch stays under the issue's 5 s target. Writes `rotation_<gpu>_<date>.json` with the command, commit
and device. About 3 minutes on an H100, most of it writing the checkpoints and compiling the engine once.

    python bench/rotation.py --out bench/results
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
import torch
from safetensors import safe_open

from grail_pipeline.inference.engine import GroupRequest, SamplingParams
from grail_pipeline.inference.fast_engine import FastEngine
from grail_pipeline.inference.loading import load_model, load_tokenizer
from grail_pipeline.mining.chain import SIMULATED_CHAIN, simulated_window
from grail_pipeline.mining.checkpoint_dir import READY_MARKER, CheckpointDir
from grail_pipeline.mining.pipeline import GpuIdle
from grail_pipeline.mining.rotation import CheckpointRotation
from grail_pipeline.protocol.sat import problem_for_seed
from grail_pipeline.protocol.tokenizer import prompt_ids
from grail_pipeline.tools.checkpoint_series import SeriesPlan, write_series

TARGET_S = 5.0  # the issue's target for W1's model, ready to first rollout


def commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True).stdout
    except OSError:
        return "unknown"
    return head + ("+uncommitted" if dirty.strip() else "")


def compiled_graphs() -> int:
    """torch.compile's graphs so far (a recompilation adds one)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def matches_checkpoint(model: torch.nn.Module, folder: Path) -> bool:
    """Every tensor of the checkpoint equals the model's, compared one tensor at a time on the GPU."""
    state = model.state_dict()
    with safe_open(str(folder / "model.safetensors"), framework="pt", device="cpu") as f:
        return all(torch.equal(state[key], f.get_tensor(key).to(state[key].device)) for key in f.keys())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="dummy:qwen2.5-3b")
    p.add_argument("--slots", type=int, default=256)
    p.add_argument("--switches", type=int, default=2)
    p.add_argument("--completion-tokens", type=int, default=256, help="length of the timed group's rollouts")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args()
    assert torch.cuda.is_available(), "a GPU bench"
    t_run = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "checkpoints"
        windows = tuple(30 * i for i in range(args.switches + 1))
        t0 = time.perf_counter()
        write_series(SeriesPlan(args.model, root, windows[:1]))
        first_write_s = time.perf_counter() - t0
        directory = CheckpointDir(root)
        first = directory.first(0, time.time())
        loaded = load_model(str(first.path), "cuda")
        tok = load_tokenizer(str(first.path))
        sampling = SamplingParams(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, max_new_tokens=1024)
        t0 = time.perf_counter()
        engine = FastEngine(loaded, sampling, slots=args.slots, max_prompt_tokens=512)
        engine_start_s = time.perf_counter() - t0
        prompt = prompt_ids(tok, problem_for_seed(11))
        group = [GroupRequest("g", prompt, [args.completion_tokens] * 16)]
        engine.generate(group)  # every kernel once
        graphs, compiled = len(engine.runner.graphs), compiled_graphs()
        pointers = [t.data_ptr() for t in loaded.model.state_dict().values()]
        weight_bytes = sum(t.numel() * t.element_size() for t in loaded.model.parameters())

        def no_restart(model: str):
            raise AssertionError(f"{model}: the bench's checkpoints share the architecture, no restart expected")

        rotation = CheckpointRotation(directory, first, no_restart)
        switches = []
        for window in windows[1:]:
            t0 = time.perf_counter()
            write_series(SeriesPlan(args.model, root, (window,)))  # published while the engine runs
            write_s = time.perf_counter() - t0
            ready_at = (root / f"checkpoint-{window}" / READY_MARKER).stat().st_mtime
            torch.cuda.synchronize()
            allocated = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            context = anyio.run(rotation.before_window, simulated_window(SIMULATED_CHAIN, window, 0, window),
                                time.time(), loaded, GpuIdle())
            assert context is not None and context.checkpoint_window == window, context
            switch = rotation.switches[-1]
            added = torch.cuda.max_memory_allocated() - allocated
            engine.generate(group)  # the window's first group of 16 rollouts, on the new weights
            first_rollout = time.time()
            same = matches_checkpoint(loaded.model, root / f"checkpoint-{window}")
            switches.append(dict(window=window, write_checkpoint_s=round(write_s, 2), copy_s=switch.seconds,
                                 ready_to_first_rollout_s=round(first_rollout - ready_at, 3),
                                 peak_memory_added_gb=round(added / 1e9, 3), weights_equal_checkpoint=same,
                                 data_ptrs_unchanged=[t.data_ptr() for t in loaded.model.state_dict().values()] == pointers))
            print(f"window {window}: copy {switch.seconds:.2f} s, ready -> first rollout "
                  f"{first_rollout - ready_at:.2f} s, peak +{added / 1e9:.2f} GB, equal {same}", flush=True)
        recaptured = len(engine.runner.graphs) - graphs
        recompiled = compiled_graphs() - compiled
    report = dict(
        command=" ".join([sys.executable, *sys.argv]), commit=commit(), device=torch.cuda.get_device_name(),
        torch=torch.__version__, model=args.model, slots=args.slots, completion_tokens=args.completion_tokens,
        weights_gb=round(weight_bytes / 1e9, 3), first_checkpoint_write_s=round(first_write_s, 1),
        engine_start_s=round(engine_start_s, 1), cuda_graphs=graphs, cuda_graphs_added=recaptured,
        compiled_graphs_added=recompiled, switches=switches, target_s=TARGET_S,
        seconds=round(time.perf_counter() - t_run, 1),
    )
    gpu = torch.cuda.get_device_name().replace(" ", "-").replace("/", "-")
    path = Path(args.out) / f"rotation_{gpu}_{time.strftime('%Y-%m-%d')}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {path}")
    assert recaptured == 0 and recompiled == 0, report
    assert all(s["weights_equal_checkpoint"] and s["data_ptrs_unchanged"] for s in switches), report
    assert all(s["peak_memory_added_gb"] < 0.1 * weight_bytes / 1e9 for s in switches), report  # no second copy
    assert all(s["ready_to_first_rollout_s"] < TARGET_S for s in switches), report


if __name__ == "__main__":
    main()
