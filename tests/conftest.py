"""Shared fixtures: the tiny random Qwen2 on the CPU, the real tokenizer, and a real wallet on disk."""

from __future__ import annotations

import pytest
import transformers
from bittensor_wallet import Keypair, Wallet

from grail_pipeline.model import LoadedModel, load_model
from grail_pipeline.tokenizer import builtin_tokenizer

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


@pytest.fixture(scope="session")
def real_wallet(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """An unencrypted hotkey written by bittensor_wallet; the environment variables that name it, and its address."""
    root = tmp_path_factory.mktemp("wallets")
    wallet = Wallet(name="cold", hotkey="hot", path=str(root))
    wallet.set_coldkeypub(Keypair.create_from_mnemonic(Keypair.generate_mnemonic()), overwrite=True)
    hotkey = Keypair.create_from_mnemonic(Keypair.generate_mnemonic())
    wallet.set_hotkey(hotkey, encrypt=False, overwrite=True)
    return {"BT_WALLET_COLD": "cold", "BT_WALLET_HOT": "hot", "BT_WALLET_PATH": str(root),
            "address": hotkey.ss58_address}
