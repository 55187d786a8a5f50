"""Mine whole windows with `mine --dry-run` and measure what reaches each window's file before its deadline.

One daemon (a subprocess, as PM2 runs it) mines `--windows` whole windows of 30 blocks; then every window
file is checked in a fresh process by `grail-pipeline verify` (F's validator rules and our strict ones,
with the deadline from the daemon's status file). Writes `window_deadline_<gpu>_<slots>_<date>.json` (to
--out) with, per window: rollouts in the file, rollouts generated but cut, seconds the file was ready
before the deadline, GPU idle seconds, write seconds and bytes per rollout, the deadline plan's numbers,
and the verify verdicts; and the share of generated rollouts that made their file on time.

    python bench/window_deadline.py --batch-size 512 --block-time 6 --windows 2 --out bench/results
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

import torch
from validator_parity import write_wallet  # the bench scripts' one wallet writer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="dummy:qwen2.5-3b")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--block-time", type=float, default=6.0)
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--upload-allowance", type=float, default=None,
                   help="seconds reserved to upload a file (mine --upload-allowance; default: its size at 100 Mbit/s)")
    p.add_argument("--proof-sample", type=int, default=32, help="rollouts per file the strict check proves")
    p.add_argument("--device", default="cuda")
    p.add_argument("--kv-cache-gb", default=None, help="mine's --kv-cache-gb (GB, auto or full; default: mine's, auto)")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"{args.batch_size}"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        env = {**os.environ, **write_wallet(work / "wallets"), "PYTHONUNBUFFERED": "1"}
        status_path = work / "status.json"
        mine = [sys.executable, "-m", "grail_pipeline", "mine", "--dry-run", "--model", args.model,
                "--device", args.device, "--batch-size", str(args.batch_size), "--block-time", f"{args.block_time:g}",
                "--max-windows", str(args.windows), "--warmup-problems", "2", "--out-dir", str(work / "windows"),
                "--status-file", str(status_path)]
        if args.upload_allowance is not None:
            mine += ["--upload-allowance", f"{args.upload_allowance:g}"]
        if args.kv_cache_gb is not None:
            mine += ["--kv-cache-gb", args.kv_cache_gb]
        t0 = time.perf_counter()
        with open(out / f"window_deadline_mine_{tag}.log", "w") as fh:
            proc = subprocess.run(mine, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=3600)
        mine_s = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.exit(f"mine exited {proc.returncode}; see {out / f'window_deadline_mine_{tag}.log'}")
        status = json.loads(status_path.read_text())
        windows = []
        for key, record in sorted(status["windows"].items(), key=lambda kv: int(kv[0])):
            path = Path(record["file"])
            verify = [sys.executable, "-m", "grail_pipeline", "verify", str(path), "--json", "--device", args.device,
                      "--status", str(status_path), "--proof-sample", str(args.proof_sample)]
            t1 = time.perf_counter()
            check = subprocess.run(verify, env=env, capture_output=True, text=True, timeout=1800)
            report = json.loads(check.stdout) if check.stdout.strip() else {"error": check.stderr[-2000:]}
            windows.append(dict(
                window_start=int(key), rollouts_in_file=record["rollouts"], cut_rollouts=record["cut_rollouts"],
                margin_s=record["margin_s"], on_time=record["on_time"], idle_gpu_s=record["idle_gpu_s"],
                write_seconds=record["write_seconds"], file_bytes=record["file_bytes"],
                bytes_per_rollout=round(record["file_bytes"] / max(1, record["rollouts"])),
                mtime_before_deadline_s=round(record["deadline"] - path.stat().st_mtime, 3),
                redraws=record["redraws"], failed_indices=record["failed_indices"], plan=record.get("plan"),
                written=record["trigger"], verify_seconds=round(time.perf_counter() - t1, 1),
                verdicts=report.get("verdicts"), verify_passed=report.get("passed"),
                random_weights=report.get("random_weights"), verify_error=report.get("error")))
    made = sum(w["rollouts_in_file"] for w in windows)
    generated = made + sum(w["cut_rollouts"] for w in windows)
    window_s = 30 * args.block_time
    result = dict(
        kind="grail-pipeline-window-deadline", created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        command=" ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), mine_command=" ".join(mine[1:]),
        mine_seconds=round(mine_s, 1), window_seconds=window_s, windows=windows,
        on_time_rollouts=made, generated_rollouts=generated,
        on_time_share=round(made / generated, 4) if generated else None,
        all_on_time=all(w["on_time"] and w["mtime_before_deadline_s"] >= 0 for w in windows),
        on_time_rollouts_per_window=round(made / len(windows), 1) if windows else 0,
        on_time_rollouts_per_s=round(made / (len(windows) * window_s), 2) if windows else 0,
    )
    gpu = result["gpu"].replace(" ", "-").replace("/", "-")
    path = out / f"window_deadline_{gpu}_{tag}_{time.strftime('%Y-%m-%d')}.json"
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "windows"}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
