"""A fleet on one host with N GPUs: one worker alone, then N workers of one hotkey through Redis, same windows.

Starts a redis-server (append-only, on a free local port), then:
1. one `mine --dry-run` worker on GPU 0 alone (no Redis: the solo daemon) for --windows windows;
2. N workers of one hotkey (CUDA_VISIBLE_DEVICES=i, GRAIL_REDIS_URL, GRAIL_WORKER_ID=i of N) for as many
   windows, sharing one simulated clock (the first worker publishes its genesis, the others adopt it);
3. (--multi-gpu-benchmark, on 2 GPUs) the guide's `GRAIL_MULTI_GPU=1 grail-pipeline benchmark` (hf engine,
   one model spread over both GPUs) against one hf benchmark process per GPU at the same time.
Per window it records the on-time rollouts, the cut rollouts and the margin before the deadline (from the
status files / the leader's report), the time from the window's end of generation (the last group that
made the file was signed) to the file in place, and whether `grail-pipeline verify` accepts the file
(`--skip-proofs` by default for speed: file, deadline, metadata, signatures, fields, prompts, rewards,
order; `--verify-proofs N` proves N rollouts per file, F's sample always). Writes
`fleet_scaling_<gpu>_<date>.json` to --out; the first window of each run is a cold start and is marked so.

    python bench/fleet_scaling.py --model dummy:qwen2.5-3b --gpus 4 --windows 3 --block-time 12 --out bench/results
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch
from bittensor_wallet import Keypair, Wallet


def write_wallet(root: Path) -> dict[str, str]:
    """An unencrypted hotkey under `root`, and the BT_WALLET_* variables that name it."""
    wallet = Wallet(name="bench", hotkey="hot", path=str(root))
    wallet.set_coldkeypub(Keypair.create_from_mnemonic(Keypair.generate_mnemonic()), overwrite=True)
    wallet.set_hotkey(Keypair.create_from_mnemonic(Keypair.generate_mnemonic()), encrypt=False, overwrite=True)
    return {"BT_WALLET_COLD": "bench", "BT_WALLET_HOT": "hot", "BT_WALLET_PATH": str(root)}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_redis(directory: Path) -> tuple[subprocess.Popen, str]:
    server = shutil.which("redis-server")
    if server is None:
        sys.exit("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
                             "--appendonly", "yes", "--save", ""], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.1)
    sys.exit("redis-server did not start")


def mine_command(args: argparse.Namespace, out_dir: Path) -> list[str]:
    command = [sys.executable, "-m", "grail_pipeline", "mine", "--dry-run", "--model", args.model,
               "--block-time", f"{args.block_time:g}", "--max-windows", str(args.windows), "--out-dir", str(out_dir),
               "--drain-timeout", "120"]
    if args.batch_size:
        command += ["--batch-size", str(args.batch_size)]
    return command + shlex.split(args.mine_args)


def run_workers(args: argparse.Namespace, env: dict[str, str], out_dir: Path, gpus: list[int],
                redis_url: str | None, logs: Path) -> float:
    """The workers of one run, started together; seconds until the last exited."""
    out_dir.mkdir(parents=True)
    procs = []
    t0 = time.perf_counter()
    for worker, gpu in enumerate(gpus):
        worker_env = {**env, "CUDA_VISIBLE_DEVICES": str(gpu), "GRAIL_WORKER_ID": str(worker),
                      "GRAIL_TOTAL_WORKERS": str(len(gpus))}
        if redis_url is not None:
            worker_env["GRAIL_REDIS_URL"] = redis_url
        log = open(logs / f"{out_dir.name}-worker-{worker}.log", "w")  # noqa: SIM115 - closed with the process
        procs.append((subprocess.Popen(mine_command(args, out_dir), env=worker_env, stdout=log,
                                       stderr=subprocess.STDOUT), log))
    timeout = (args.windows + 3) * 30 * args.block_time + 900  # the model load and warm-up, then the windows
    for proc, log in procs:
        try:
            rc = proc.wait(timeout=max(1.0, timeout - (time.perf_counter() - t0)))
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        log.close()
        if rc != 0:
            print(f"a worker of {out_dir.name} exited {rc}: see {log.name}", file=sys.stderr)
    return time.perf_counter() - t0


def verify(path: Path, args: argparse.Namespace, env: dict[str, str]) -> dict:
    command = [sys.executable, "-m", "grail_pipeline", "verify", str(path), "--json"]
    command += ["--proof-sample", str(args.verify_proofs)] if args.verify_proofs else ["--skip-proofs"]
    proc = subprocess.run(command, env={**env, "CUDA_VISIBLE_DEVICES": "0"}, capture_output=True, text=True,
                          timeout=1800)
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        return {"exit_code": proc.returncode, "error": proc.stderr.strip().splitlines()[-1:] or ["?"]}
    failed = [c["name"] for c in report.get("checks", []) if c.get("passed", 0) < c.get("checked", 0)]
    return {"exit_code": proc.returncode, "accepted": bool(report.get("passed")), "rollouts": report.get("rollouts"),
            "proofs": "skipped (--skip-proofs)" if not args.verify_proofs else
            f"{args.verify_proofs} rollouts + F's sample", "checks_not_all_passed": failed}


def windows_of(out_dir: Path, args: argparse.Namespace, env: dict[str, str]) -> list[dict]:
    """Per window file: on-time and cut rollouts, margin, generation end → file, verify's verdict."""
    statuses = [json.loads(p.read_text()) for p in sorted(out_dir.glob("status-worker-*.json"))]
    records = {}
    for status in statuses:
        records.update(status.get("windows") or {})
    rows = []
    for path in sorted(out_dir.glob("*-window-*.parquet"), key=lambda p: int(p.stem.rsplit("-", 1)[1])):
        meta = {k.decode(): v.decode() for k, v in (pq.read_schema(path).metadata or {}).items()}
        start = int(meta["window_start"])
        record = records.get(str(start), {})
        opened = float(meta["genesis"]) + start * float(meta["block_time"])
        ready = record.get("ready_at") or path.stat().st_mtime
        last_group = opened + float(record.get("seconds") or 0.0)  # the last group in the file was signed then
        rows.append({
            "window_start": start, "file": path.name, "written": meta.get("written"),
            "groups": int(meta["groups"]), "on_time_rollouts": int(meta["inference_count"]),
            "cut_rollouts": int(meta["cut_rollouts"]), "margin_s": record.get("margin_s"),
            "generation_end_to_file_s": round(ready - last_group, 3) if record else None,
            "fleet_workers": meta.get("fleet_workers"), "writer": meta.get("fleet_writer") or "solo",
            "verify": verify(path, args, env)})
    if rows:
        rows[0]["cold_start"] = True  # the first window opens while kernels compile and the clock is young
    return rows


def benchmark(args: argparse.Namespace, env: dict[str, str], gpus: str, multi: bool, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "grail_pipeline", "benchmark", "--model", args.model, "--engine", "hf",
               "--batch-sizes", "16", "--num-problems", str(args.benchmark_problems), "--json", "-"]
    extra = {"CUDA_VISIBLE_DEVICES": gpus, **({"GRAIL_MULTI_GPU": "1"} if multi else {})}
    return subprocess.Popen(command, env={**env, **extra}, stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)


def rollouts_per_s(proc: subprocess.Popen) -> float | None:
    out, _ = proc.communicate(timeout=3600)
    try:
        rows = json.loads(out)["results"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None
    ok = [r for r in rows if r.get("rollouts_per_s")]
    return max(r["rollouts_per_s"] for r in ok) if ok else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="dummy:qwen2.5-3b")
    p.add_argument("--gpus", type=int, default=torch.cuda.device_count(), help="GPUs (workers) of the fleet")
    p.add_argument("--windows", type=int, default=3, help="windows per run (the first is a cold start)")
    p.add_argument("--block-time", type=float, default=12.0, help="seconds per simulated block (30 per window)")
    p.add_argument("--batch-size", type=int, default=None, help="decode slots (default: the daemon's)")
    p.add_argument("--mine-args", default="", help="more flags for every `mine` (e.g. a CPU rehearsal: "
                   "'--device cpu --engine fast --length-profile fixed:16 --max-new-tokens 16 --batch-size 16')")
    p.add_argument("--verify-proofs", type=int, default=0, metavar="N",
                   help="prove N rollouts per file in verify (default 0: --skip-proofs, for speed)")
    p.add_argument("--multi-gpu-benchmark", action=argparse.BooleanOptionalAction, default=True,
                   help="also GRAIL_MULTI_GPU=1 benchmark on 2 GPUs vs one hf benchmark per GPU")
    p.add_argument("--benchmark-problems", type=int, default=4)
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args()
    if args.gpus < 1:
        sys.exit("no GPU: this bench needs at least one (see --gpus)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"kind": "grail-pipeline-fleet-scaling", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                    "gpus": args.gpus, "model": args.model, "block_time_s": args.block_time, "windows": args.windows,
                    "verify": "proofs skipped (--skip-proofs)" if not args.verify_proofs
                    else f"--proof-sample {args.verify_proofs}"}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        env = {**os.environ, **write_wallet(work / "wallets"), "PYTHONUNBUFFERED": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
        env.pop("GRAIL_REDIS_URL", None)
        (work / "redis").mkdir()
        redis, url = start_redis(work / "redis")
        try:
            solo_s = run_workers(args, env, work / "solo", [0], None, out)
            result["solo"] = {"seconds": round(solo_s, 1), "command": " ".join(mine_command(args, work / "solo")[1:]),
                              "windows": windows_of(work / "solo", args, env)}
            fleet_s = run_workers(args, env, work / "fleet", list(range(args.gpus)), url, out)
            result["fleet"] = {"seconds": round(fleet_s, 1), "workers": args.gpus, "redis": "redis-server on this host",
                               "windows": windows_of(work / "fleet", args, env)}
        finally:
            redis.terminate()
            redis.wait()
        if args.multi_gpu_benchmark and args.gpus >= 2:
            multi = rollouts_per_s(benchmark(args, env, "0,1", True, out / "fleet_multi_gpu_benchmark.log"))
            per_gpu = [benchmark(args, env, str(i), False, out / f"fleet_per_gpu_benchmark_{i}.log") for i in (0, 1)]
            singles = [rollouts_per_s(proc) for proc in per_gpu]
            result["multi_gpu_benchmark"] = {
                "engine": "hf (GRAIL_MULTI_GPU spreads one hf model over the visible GPUs)",
                "multi_gpu_rollouts_per_s": multi, "one_worker_per_gpu_rollouts_per_s": singles,
                "one_worker_per_gpu_total": None if None in singles else round(sum(singles), 3)}

    def steady(rows: list[dict]) -> list[int]:
        return [r["on_time_rollouts"] for r in rows if not r.get("cold_start")]

    solo, fleet = steady(result["solo"]["windows"]), steady(result["fleet"]["windows"])
    if solo and fleet:
        per_window_solo = sum(solo) / len(solo)
        result["scaling"] = {"solo_on_time_per_window": round(per_window_solo, 1),
                             "fleet_on_time_per_window": round(sum(fleet) / len(fleet), 1),
                             "fleet_vs_n_times_solo": round(sum(fleet) / len(fleet) / (args.gpus * per_window_solo), 3)
                             if per_window_solo else None}
    gpu = result["gpu"].replace(" ", "-").replace("/", "-")
    path = out / f"fleet_scaling_{gpu}_{time.strftime('%Y-%m-%d')}.json"
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
