"""Several hotkeys from one engine: mine whole windows with `mine --dry-run --hotkeys` and check every hotkey's files.

One daemon (a subprocess, as PM2 runs it) mines `--hotkeys` hotkeys from one loaded model and one engine, each
to its cap's target (`--target-rollouts`, default `cap`: 5,120 a window), for `--windows` windows of 30 blocks of
`--block-time` seconds; then every hotkey's window file is checked in a fresh process by `grail-pipeline verify`
(F's validator rules and our strict ones with a proof sample, the deadline from that hotkey's status file), the
verifies running side by side. Writes `hotkeys_<gpu>_<n>x_<date>.json` (to --out, default $OUT) with, per hotkey
and window: rollouts in the file, whether it reached the target, on time, margin, cut rollouts, the verdicts;
the daemon's spare-capacity records (how many more hotkeys the engine could have served); and the verdict
`every_file_at_target_on_time_and_verified`.

The issue's measurement is two 360-s windows at real block time (12 s); one window with start-up and checks takes
about 8 minutes on an H200 with W1, so under the device's 10-minute limit run one window per call:

    python bench/hotkeys.py --hotkeys 2 --windows 1 --block-time 12 --batch-size 512
    python bench/hotkeys.py --model dummy:qwen3-4b --hotkeys 1 --windows 1 --batch-size 192   # W2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from validator_parity import write_wallet  # the bench scripts' one wallet writer

from grail_pipeline.mining.status import hotkey_status_path


def verify(path: Path, status: Path, env: dict[str, str], args: argparse.Namespace) -> dict:
    command = [sys.executable, "-m", "grail_pipeline", "verify", str(path), "--json", "--device", args.device,
               "--status", str(status), "--proof-sample", str(args.proof_sample)]
    t0 = time.perf_counter()
    try:
        run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.verify_timeout)
    except subprocess.TimeoutExpired:  # a verdict of its own: the mining figures are kept (2026-12-03 lost them)
        report = {"error": f"verify did not finish within --verify-timeout {args.verify_timeout:g} s"}
    else:
        report = json.loads(run.stdout) if run.stdout.strip() else {"error": run.stderr[-2000:]}
    return dict(verify_seconds=round(time.perf_counter() - t0, 1), verdicts=report.get("verdicts"),
                verify_passed=report.get("passed"), random_weights=report.get("random_weights"),
                verify_error=report.get("error"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="dummy:qwen2.5-3b")
    p.add_argument("--hotkeys", type=int, default=2, help="hotkeys mined from the one engine")
    p.add_argument("--target-rollouts", default="cap", help="mine's --target-rollouts (N or cap)")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--block-time", type=float, default=12.0, help="seconds per block (12: real block time)")
    p.add_argument("--windows", type=int, default=1)
    p.add_argument("--proof-sample", type=int, default=32, help="rollouts per file the strict check proves")
    p.add_argument("--verify-timeout", type=float, default=300.0)
    p.add_argument("--device", default="cuda")
    p.add_argument("--mine-args", default="", help="more of mine's flags, e.g. for a CPU rehearsal: "
                   "'--length-profile fixed:16 --max-new-tokens 16'")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"{args.hotkeys}x_{args.batch_size}"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        hot = [f"hot{i}" for i in range(args.hotkeys)]
        for name in hot:
            env.update(write_wallet(work / "wallets", name))
        for name in ("BT_WALLET_COLD", "BT_WALLET_HOT"):
            env.pop(name)
        status_path = work / "status.json"
        mine = [sys.executable, "-m", "grail_pipeline", "mine", "--dry-run", "--model", args.model,
                "--device", args.device, "--batch-size", str(args.batch_size), "--block-time", f"{args.block_time:g}",
                "--max-windows", str(args.windows), "--warmup-problems", "2", "--out-dir", str(work / "windows"),
                "--status-file", str(status_path), "--hotkeys", ",".join(f"bench/{h}" for h in hot),
                "--target-rollouts", args.target_rollouts, *args.mine_args.split()]
        log = out / f"hotkeys_mine_{tag}.log"
        t0 = time.perf_counter()
        with open(log, "w") as fh:
            proc = subprocess.run(mine, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=3600)
        mine_s = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.exit(f"mine exited {proc.returncode}; see {log}")
        statuses = sorted(work.glob("status-*.json")) if args.hotkeys > 1 else [status_path]
        by_hotkey = {json.loads(p.read_text())["hotkey"]: p for p in statuses}
        jobs = []
        for hotkey, path in by_hotkey.items():
            assert args.hotkeys == 1 or path == hotkey_status_path(status_path, hotkey)
            status = json.loads(path.read_text())
            for key, record in sorted(status["windows"].items(), key=lambda kv: int(kv[0])):
                jobs.append((hotkey, path, status, int(key), record))
        # one window's files at a time: four checks at once on one H200 (two windows of two hotkeys) each took
        # longer than 100 s, where two at once had taken less (bench/results/h200-2026-12-03/)
        with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), args.hotkeys))) as pool:
            checks = list(pool.map(lambda job: verify(Path(job[4]["file"]), job[1], env, args), jobs))
        target = None
        files = []
        for (hotkey, _, status, start, record), check in zip(jobs, checks):
            target = status.get("target_rollouts")
            path = Path(record["file"])
            files.append(dict(
                hotkey=hotkey, window_start=start, rollouts_in_file=record["rollouts"],
                at_target=target is not None and record["rollouts"] >= target, cut_rollouts=record["cut_rollouts"],
                margin_s=record["margin_s"], on_time=record["on_time"],
                mtime_before_deadline_s=round(record["deadline"] - path.stat().st_mtime, 3),
                issued_groups=record["issued_groups"], redraws=record["redraws"],
                failed_indices=record["failed_indices"], written=record["trigger"], idle_gpu_s=record["idle_gpu_s"],
                file_bytes=record["file_bytes"], plan=record.get("plan"), **check))
        spare = {h: json.loads(p.read_text()).get("spare_capacity") for h, p in by_hotkey.items()}
    window_s = 30 * args.block_time
    result = dict(
        kind="grail-pipeline-hotkeys", created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        command=" ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), mine_command=" ".join(mine[1:]),
        mine_seconds=round(mine_s, 1), window_seconds=window_s, hotkeys=args.hotkeys, target_rollouts=target,
        files=files, spare_capacity_last_window=next((s for s in spare.values() if s), None),
        on_time_rollouts=sum(f["rollouts_in_file"] for f in files if f["on_time"]),
        every_file_at_target_on_time_and_verified=bool(files) and len(files) == args.hotkeys * args.windows and all(
            f["at_target"] and f["on_time"] and f["mtime_before_deadline_s"] >= 0 and f["verify_passed"]
            for f in files),
    )
    gpu = result["gpu"].replace(" ", "-").replace("/", "-")
    path = out / f"hotkeys_{gpu}_{tag}_{time.strftime('%Y-%m-%d')}.json"
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "files"}, indent=1))
    for f in files:
        print(f"{f['hotkey'][:10]}… window {f['window_start']}: {f['rollouts_in_file']} rollouts, on time "
              f"{f['on_time']} ({f['margin_s']} s), verify {f['verify_passed']} {f['verdicts']}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
