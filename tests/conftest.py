"""Shared fixtures: the tiny random Qwen2 on the CPU, the real tokenizer, and a real wallet on disk."""

from __future__ import annotations

from pathlib import Path

import pytest
import transformers
from bittensor_wallet import Keypair, Wallet

from grail_pipeline.cli.main import main
from grail_pipeline.inference.loading import LoadedModel, load_model
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
