"""Mine a window from a dummy preset, then check it the way a validator would, in a fresh process.

The miner (`grail-pipeline mine --dry-run`) and the check (`grail-pipeline verify`) are two separate
processes: the check loads the model from the dummy preset's checkpoint directory with plain
`from_pretrained` (bf16 into host memory, then the GPU), exactly as it would load any checkpoint, and
shares nothing with the engine that mined the window. Writes `validator_parity_<gpu>_<date>.json` (to
--out) with the pass rate of every check, the model path the check used, and both commands.

    python bench/validator_parity.py --out bench/results
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
from bittensor_wallet import Keypair, Wallet


def write_wallet(root: Path, hot: str = "hot") -> dict[str, str]:
    """An unencrypted hotkey under `root`, and the BT_WALLET_* variables that name it."""
    wallet = Wallet(name="bench", hotkey=hot, path=str(root))
    wallet.set_coldkeypub(Keypair.create_from_mnemonic(Keypair.generate_mnemonic()), overwrite=True)
    wallet.set_hotkey(Keypair.create_from_mnemonic(Keypair.generate_mnemonic()), encrypt=False, overwrite=True)
    return {"BT_WALLET_COLD": "bench", "BT_WALLET_HOT": hot, "BT_WALLET_PATH": str(root)}


def run(command: list[str], env: dict[str, str], log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(command, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=1200)
    if proc.returncode not in (0, 1):  # verify exits 1 when a check fails: that is a result, not an error
        sys.exit(f"{' '.join(command)} exited {proc.returncode}; see {log}")
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="dummy:qwen2.5-3b")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--block-time", type=float, default=2.0)
    p.add_argument("--window-blocks", type=int, default=15)
    p.add_argument("--proof-sample", type=int, default=128, help="rollouts whose proofs the check recomputes")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args()
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        env = {**os.environ, **write_wallet(work / "wallets"), "PYTHONUNBUFFERED": "1"}
        mine = [sys.executable, "-m", "grail_pipeline", "mine", "--dry-run", "--model", args.model,
                "--batch-size", str(args.batch_size), "--block-time", f"{args.block_time:g}",
                "--window-blocks", str(args.window_blocks), "--max-windows", "1", "--out-dir", str(work / "windows")]
        mine_s = run(mine, env, out / "validator_parity_mine.log")
        (window_file,) = sorted((work / "windows").glob("*.parquet"))
        verify = [sys.executable, "-m", "grail_pipeline", "verify", str(window_file), "--json",
                  "--proof-sample", str(args.proof_sample)]
        t0 = time.perf_counter()
        proc = subprocess.run(verify, env=env, capture_output=True, text=True, timeout=1200)
        verify_s = time.perf_counter() - t0
        (out / "validator_parity_verify.log").write_text(proc.stderr)
        report = json.loads(proc.stdout)
    checks = {c["name"]: dict(checked=c["checked"], passed=c["passed"], skipped=c["skipped"]) for c in report["checks"]}
    proofs = checks["proofs"]
    result = dict(
        kind="grail-pipeline-validator-parity", created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        mine_command=" ".join(mine[1:]), verify_command=" ".join(verify[1:]), mine_seconds=round(mine_s, 1),
        verify_seconds=round(verify_s, 1), rollouts=report["rollouts"], groups=report["groups"],
        model=report["model"], model_path=report["model_path"], passed=report["passed"], checks=checks,
        proof_pass_rate=proofs["passed"] / proofs["checked"] if proofs["checked"] else None,
    )
    gpu = result["gpu"].replace(" ", "-").replace("/", "-")
    path = out / f"validator_parity_{gpu}_{time.strftime('%Y-%m-%d')}.json"
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    print(f"wrote {path}: {proofs['passed']}/{proofs['checked']} rollouts' proofs pass, checked in a fresh process "
          f"on the model loaded from {report['model_path']}")


if __name__ == "__main__":
    main()
