"""Shared fixtures: the tiny random Qwen2 on the CPU, the real tokenizer, and a real wallet on disk."""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import transformers
from bittensor_wallet import Keypair, Wallet

from grail_pipeline.cli.main import main
from grail_pipeline.inference.loading import LoadedModel, load_model
from grail_pipeline.protocol.profile import PROFILE
from grail_pipeline.protocol.tokenizer import builtin_tokenizer

WALLET_VARS = ("BT_WALLET_COLD", "BT_WALLET_HOT", "BT_WALLET_PATH")


@pytest.fixture(scope="session")
def tiny() -> LoadedModel:
    """`dummy:tiny`: Qwen2 architecture, hidden 64, 2 layers, the real 151936-token vocabulary, float32 on the CPU.

    Shared by every test that only reads it (the fast engine fuses its projections into views of the
    same numbers, which changes no value).
    """
    return load_model("dummy:tiny", device="cpu")


@pytest.fixture(scope="session")
def tok() -> transformers.PreTrainedTokenizerFast:
    return builtin_tokenizer()


def write_wallet(root: Path, cold: str = "cold", hot: str = "hot") -> str:
    """A real unencrypted hotkey (and cold public key) written by bittensor_wallet under `root`; its address."""
    wallet = Wallet(name=cold, hotkey=hot, path=str(root))
    wallet.set_coldkeypub(Keypair.create_from_mnemonic(Keypair.generate_mnemonic()), overwrite=True)
    hotkey = Keypair.create_from_mnemonic(Keypair.generate_mnemonic())
    wallet.set_hotkey(hotkey, encrypt=False, overwrite=True)
    return hotkey.ss58_address


@pytest.fixture(scope="session")
def real_wallet(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """An unencrypted hotkey on disk; the environment variables that name it, and its address."""
    root = tmp_path_factory.mktemp("wallets")
    address = write_wallet(root)
    return {"BT_WALLET_COLD": "cold", "BT_WALLET_HOT": "hot", "BT_WALLET_PATH": str(root), "address": address}


@pytest.fixture(scope="session")
def wallet_env(real_wallet: dict[str, str]) -> dict[str, str]:
    """Only the BT_WALLET_* variables of `real_wallet`."""
    return {k: real_wallet[k] for k in WALLET_VARS}


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """`grail-pipeline ARGV` in-process: exit code (argparse's SystemExit included), stdout, stderr."""
    try:
        rc = main(list(argv))
    except SystemExit as exc:  # argparse errors leave through parser.exit
        rc = exc.code
    out, err = capsys.readouterr()
    return int(rc or 0), out, err


class RedisServer:
    """A real redis-server on a free local port, its data in a temp dir (append-only file, fsync always, so a
    stop and start keeps what it had, as a fleet's server should be configured)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory):
    """A real redis-server for the fleet tests, started once and stopped at the end (tests use their own
    hotkey namespace; one that stops it must start it again)."""
    if shutil.which("redis-server") is None:
        (pytest.fail if os.environ.get("CI") else pytest.skip)("redis-server is not installed")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


# --- windows sized from this machine's speed now -------------------------------------------------------------

def measure_group_seconds(engine: str) -> float:
    """Seconds one group of the daemon tests' workload (dummy:tiny on the CPU, 16 rollouts of 16 tokens,
    generated, proved and signed) takes in this process now, after one group that pays the first-call costs."""
    import anyio

    from grail_pipeline.mining.runtime import Runtime
    from grail_pipeline.mining.workload import benchmark_window, warm_up
    from grail_pipeline.protocol.wallet import ephemeral_signer

    runtime = Runtime.from_args(argparse.Namespace(model="dummy:tiny", device="cpu", engine=engine,
                                                   length_profile="fixed:16", max_new_tokens=16,
                                                   max_prompt_tokens=512))
    try:
        engine_ = runtime.engine(16)
        signer = ephemeral_signer()
        anyio.run(warm_up, runtime.pipeline(engine_, signer), runtime, benchmark_window(0), 1)
        t0 = time.perf_counter()
        anyio.run(warm_up, runtime.pipeline(engine_, signer), runtime, benchmark_window(1), 2)
        return (time.perf_counter() - t0) / 2
    finally:
        runtime.close()


@pytest.fixture(scope="session")
def group_seconds() -> Callable[[str], float]:
    """`group_seconds(engine)`: one group's seconds on this machine, measured once per engine and session. The
    daemon tests size their windows from it: on an idle 2-core box a group takes 1-2 s, on a loaded one (the
    CI box, other jobs beside the tests) 10-30 s, and fixed 12-s windows then lost every group to the cut."""
    measured: dict[str, float] = {}

    def seconds(engine: str = "hf") -> float:
        if engine not in measured:
            measured[engine] = measure_group_seconds(engine)
        return measured[engine]

    return seconds


def block_time_for(group_s: float, groups: float, processes: int = 1, blocks: int = 30, floor: float = 0.4) -> str:
    """A `--block-time` whose `blocks`-block window has room for `groups` groups of `group_s` each, slowed by
    `processes` daemons sharing the cores, after the deadline's slack and the write; never under `floor`
    (the tests' 12-s windows of an idle box). A string, for the command line."""
    window = PROFILE.upload_deadline_slack_s + 1.5 + groups * group_s * processes
    return f"{max(floor, window / blocks):.3f}"
