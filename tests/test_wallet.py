"""Hotkey loading and sr25519 signing with real keys and a real wallet on disk (no mocks)."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import pytest
from bittensor_wallet import Keypair, Wallet

from grail_pipeline.common.errors import UserError
from grail_pipeline.protocol.sketches import commit_binding
from grail_pipeline.protocol.wallet import (
    Signer,
    ephemeral_signer,
    load_signer,
    rollout_challenge,
    sign_commit,
    sign_rollout,
    verify_commit,
    verify_rollout_signature,
    verify_signature,
)

COLD, HOT = "miner-cold", "miner-hot"


@pytest.fixture
def wallet_dir(tmp_path: Path) -> tuple[dict[str, str], Keypair, list[str]]:
    """A wallet written by bittensor_wallet itself: coldkeypub plus an unencrypted hotkey.

    Returns the env naming it, the hotkey and the secret strings that must never be shown.
    """
    mnemonic = Keypair.generate_mnemonic()
    hotkey = Keypair.create_from_mnemonic(mnemonic)
    wallet = Wallet(name=COLD, hotkey=HOT, path=str(tmp_path))
    wallet.set_coldkeypub(Keypair.create_from_mnemonic(Keypair.generate_mnemonic()), overwrite=True)
    wallet.set_hotkey(hotkey, encrypt=False, overwrite=True)
    stored = json.loads(Path(wallet.hotkey_file.path).read_text())
    words = mnemonic.split()  # pairs of words: a single BIP39 word ("file", "able") is ordinary English
    secrets = [mnemonic, *(" ".join(words[i:i + 2]) for i in range(3)), stored["secretSeed"], stored["privateKey"],
               stored["secretSeed"].removeprefix("0x")]
    env = {"BT_WALLET_COLD": COLD, "BT_WALLET_HOT": HOT, "BT_WALLET_PATH": str(tmp_path)}
    return env, hotkey, secrets


def hotkey_path(env: dict[str, str]) -> Path:
    return Path(env["BT_WALLET_PATH"]) / env["BT_WALLET_COLD"] / "hotkeys" / env["BT_WALLET_HOT"]


def assert_nothing_secret(secrets: list[str], *texts: str) -> None:
    """No secret in any text: the mnemonic, pairs of its words, the seed and key in their spellings. (Single
    words failed at random: the message says "file", a BIP39 word.)"""
    for text in texts:
        for secret in secrets:
            assert secret not in text, secret


def load_error(env: dict[str, str], required: bool = True) -> str:
    with pytest.raises(UserError) as info:
        load_signer(required=required, env=env)
    message = str(info.value)
    assert "\n" not in message
    assert info.value.__cause__ is None  # no chained library error (its text may quote the key)
    assert info.value.__context__ is None or info.value.__suppress_context__
    return message


@pytest.mark.parametrize("required", [True, False])
def test_loads_the_wallet_hotkey(wallet_dir, required, caplog, capsys) -> None:
    env, hotkey, secrets = wallet_dir
    caplog.set_level(logging.DEBUG)
    signer = load_signer(required=required, env=env)
    assert signer.ss58_address == hotkey.ss58_address
    assert not signer.ephemeral
    data = b"rollout bytes"
    assert verify_signature(hotkey.ss58_address, data, signer.sign(data))
    captured = capsys.readouterr()
    assert_nothing_secret(secrets, caplog.text, captured.out, captured.err, repr(signer))


def test_wallet_path_defaults_to_home(wallet_dir, monkeypatch) -> None:
    env, hotkey, _ = wallet_dir
    home = Path(env["BT_WALLET_PATH"]).parent / "home"
    (home / ".bittensor").mkdir(parents=True)
    Path(env["BT_WALLET_PATH"]).rename(home / ".bittensor" / "wallets")
    monkeypatch.setenv("HOME", str(home))
    signer = load_signer(required=True, env={"BT_WALLET_COLD": COLD, "BT_WALLET_HOT": HOT})
    assert signer.ss58_address == hotkey.ss58_address


def test_required_without_env_is_one_user_error() -> None:
    message = load_error({}, required=True)
    assert "BT_WALLET_COLD" in message and "BT_WALLET_HOT" in message


def test_optional_without_env_is_ephemeral_with_one_warning(caplog, capsys) -> None:
    caplog.set_level(logging.DEBUG, logger="grail_pipeline")
    signer = load_signer(required=False, env={"BT_WALLET_PATH": "/nonexistent"})
    assert signer.ephemeral
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "grail_pipeline"]
    assert len(warnings) == 1 and "ephemeral" in warnings[0].getMessage()
    assert verify_signature(signer.ss58_address, b"x", signer.sign(b"x"))
    # The ephemeral key's secrets are never exposed, so assert that nothing else was said at all.
    assert [r.getMessage() for r in caplog.records] == [warnings[0].getMessage()]
    assert capsys.readouterr() == ("", "")
    assert signer.ss58_address not in warnings[0].getMessage() and "keypair" not in repr(signer)
    assert load_signer(required=False, env={}).ss58_address != signer.ss58_address


@pytest.mark.parametrize("required", [True, False])
def test_missing_hotkey_file_names_the_path(wallet_dir, required) -> None:
    env, _, _ = wallet_dir
    env = {**env, "BT_WALLET_HOT": "typo"}
    message = load_error(env, required)
    assert str(hotkey_path(env)) in message and "does not exist" in message


def test_missing_wallet_directory(tmp_path) -> None:
    env = {"BT_WALLET_COLD": COLD, "BT_WALLET_HOT": HOT, "BT_WALLET_PATH": str(tmp_path / "nowhere")}
    assert str(hotkey_path(env)) in load_error(env)


@pytest.mark.parametrize("content", [b"", b"not json \x00\xff", b'{"secretPhrase": "a b c"}', "truncated"])
@pytest.mark.parametrize("required", [True, False])
def test_corrupt_hotkey_file(wallet_dir, content, required, capsys) -> None:
    env, _, secrets = wallet_dir
    path = hotkey_path(env)
    path.write_bytes(path.read_bytes()[:200] if content == "truncated" else content)
    message = load_error(env, required)
    assert str(path) in message and "not a usable hotkey" in message
    captured = capsys.readouterr()
    assert_nothing_secret(secrets, message, captured.out, captured.err)


def test_public_only_hotkey_file(wallet_dir) -> None:
    env, _, _ = wallet_dir
    path = hotkey_path(env)
    path.write_text((path.parent.parent / "coldkeypub.txt").read_text())
    assert "no private key" in load_error(env)


def test_encrypted_hotkey_is_refused_without_prompting(wallet_dir, capsys) -> None:
    env, hotkey, secrets = wallet_dir
    Wallet(name=COLD, hotkey=HOT, path=env["BT_WALLET_PATH"]).set_hotkey(
        hotkey, encrypt=True, overwrite=True, hotkey_password="Correct-Horse-9")
    capsys.readouterr()
    message = load_error(env)  # would block on a password prompt if the library were asked to decrypt
    assert str(hotkey_path(env)) in message and "encrypted" in message
    captured = capsys.readouterr()
    assert "password" not in captured.out.lower()
    assert_nothing_secret(secrets, message, captured.out, captured.err)


def test_hotkey_path_that_is_a_directory(wallet_dir) -> None:
    env, _, _ = wallet_dir
    path = hotkey_path(env)
    path.unlink()
    path.mkdir()
    assert "not a readable file" in load_error(env)


@pytest.mark.parametrize("name", ["BT_WALLET_COLD", "BT_WALLET_HOT"])
def test_half_configured_wallet(wallet_dir, name) -> None:
    env, _, _ = wallet_dir
    env = {k: v for k, v in env.items() if k != name}
    assert name in load_error(env, required=False)


def test_signatures_are_randomised_and_tamper_evident() -> None:
    signer = load_signer(required=False, env={})
    data = b"some rollout payload"
    first, second = signer.sign(data), signer.sign(data)
    assert first != second  # sr25519 signatures are randomised: verify, never compare
    assert verify_signature(signer.ss58_address, data, first)
    assert verify_signature(signer.ss58_address, data, second)
    assert not verify_signature(signer.ss58_address, data + b"!", first)
    assert not verify_signature(signer.ss58_address, data, bytes([first[0] ^ 1]) + first[1:])
    other = Signer(Keypair.create_from_mnemonic(Keypair.generate_mnemonic()))
    assert not verify_signature(other.ss58_address, data, first)
    assert not verify_signature(signer.ss58_address, data, b"\x00" * 3)
    assert not verify_signature("not-an-address", data, first)


def test_commit_signature_round_trip() -> None:
    signer = load_signer(required=False, env={})
    commitments = [{"sketch": 5, "indices": [1, 2], "position": 0}]
    binding = commit_binding([1, 2, 3], "ab" * 32, "Qwen/Qwen3-4B-Instruct-2507", -1, commitments)
    signature = sign_commit(signer, binding)
    assert len(bytes.fromhex(signature)) == 64
    assert verify_commit(signer.ss58_address, binding, signature)
    tampered = commit_binding([1, 2, 4], "ab" * 32, "Qwen/Qwen3-4B-Instruct-2507", -1, commitments)
    assert not verify_commit(signer.ss58_address, tampered, signature)
    assert not verify_commit(signer.ss58_address, binding, "zz" + signature[2:])


def test_rollout_challenge_and_signature() -> None:
    block_hash = "0x496aca80e4d8f29fb8e8cd816c3afb48d3f103970b3a2ee1600c08ca67326dee"
    challenge = rollout_challenge(block_hash, 1203)
    assert challenge == f"|{block_hash}|1203"
    signer = load_signer(required=False, env={})
    signature = sign_rollout(signer, challenge)
    assert verify_rollout_signature(signer.ss58_address, challenge, signature)
    assert not verify_rollout_signature(signer.ss58_address, rollout_challenge(block_hash, 1204), signature)


def test_ephemeral_signer_pickles_as_its_seed() -> None:
    signer = ephemeral_signer()
    copy = pickle.loads(pickle.dumps(signer))
    assert copy.ss58_address == signer.ss58_address and copy.ephemeral
    assert verify_signature(signer.ss58_address, b"x", copy.sign(b"x"))
    seed = signer._rebuild[1][0]
    assert len(bytes.fromhex(seed)) == 32 and seed not in repr(signer)
    assert pickle.loads(pickle.dumps(copy)).ss58_address == signer.ss58_address


def test_wallet_signer_pickles_as_its_hotkey_file_and_rereads_it(wallet_dir) -> None:
    env, hotkey, secrets = wallet_dir
    signer = load_signer(required=True, env=env)
    data = pickle.dumps(signer)
    assert_nothing_secret(secrets, data.decode("latin-1"), repr(signer))  # the path travels, not the key
    copy = pickle.loads(data)
    assert copy.ss58_address == hotkey.ss58_address and not copy.ephemeral
    assert verify_signature(hotkey.ss58_address, b"x", copy.sign(b"x"))

    # the worker reads the file again with the same checks; a different key there is refused, not used
    path = hotkey_path(env)
    wallet = Wallet(name=env["BT_WALLET_COLD"], hotkey=env["BT_WALLET_HOT"], path=env["BT_WALLET_PATH"])
    wallet.set_hotkey(Keypair.create_from_mnemonic(Keypair.generate_mnemonic()), encrypt=False, overwrite=True)
    with pytest.raises(UserError, match="changed while the miner was running"):
        pickle.loads(data)
    path.unlink()
    with pytest.raises(UserError, match="does not exist"):
        pickle.loads(data)


def test_a_signer_without_a_source_refuses_to_pickle() -> None:
    with pytest.raises(TypeError, match="bare Keypair"):
        pickle.dumps(Signer(Keypair.create_from_mnemonic(Keypair.generate_mnemonic())))
