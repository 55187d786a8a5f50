"""The miner's sr25519 hotkey: loading it from a bittensor wallet, signing and verifying.

The daemon must never mine with a key it cannot sign with, so every way a hotkey can be unusable
(missing, unreadable, encrypted, corrupt, public only) becomes one `UserError` line naming the
file. The benchmark may run without a wallet: it then signs with an in-memory key, so that signing
costs what it costs in production. Key material never reaches a message or a log.

Signing runs in worker processes on the GPU (signing.SigningPool), and a bittensor `Keypair` can be
neither pickled nor asked for its private key, so a `Signer` pickles as the way to rebuild its key:
the ephemeral key's seed (which therefore stays in memory), or the hotkey file's path, read again
with the same checks.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from bittensor_wallet import Keyfile, Keypair, Wallet

from grail_pipeline.common.errors import UserError

logger = logging.getLogger("grail_pipeline")

ENV_COLD = "BT_WALLET_COLD"
ENV_HOT = "BT_WALLET_HOT"
ENV_PATH = "BT_WALLET_PATH"
DEFAULT_WALLET_PATH = "~/.bittensor/wallets"


@dataclass(frozen=True)
class Signer:
    """A hotkey that can sign; `ephemeral` marks a throw-away key made for a benchmark.

    `_rebuild` (function and arguments) is what the signer pickles as, so that a worker process can
    make the same key; a signer built from a bare Keypair has none and refuses to be pickled.
    """

    keypair: Keypair = field(repr=False)
    ephemeral: bool = False
    _rebuild: tuple[Callable[..., Signer], tuple[str, ...]] | None = field(default=None, repr=False, compare=False)

    @property
    def ss58_address(self) -> str:
        return self.keypair.ss58_address

    def sign(self, data: bytes) -> bytes:
        """A 64-byte sr25519 signature (randomised: two signatures of the same data differ)."""
        return bytes(self.keypair.sign(data))

    def __reduce__(self) -> tuple[Callable[..., Signer], tuple[str, ...]]:
        if self._rebuild is None:
            raise TypeError(f"the signer for {self.ss58_address} was built from a bare Keypair and cannot be "
                            f"pickled (use ephemeral_signer or load_signer)")
        return self._rebuild


def ephemeral_signer() -> Signer:
    """A fresh in-memory sr25519 key from a random seed, kept (in memory only) so that workers can sign with it."""
    return _seed_signer(os.urandom(32).hex())


def _seed_signer(seed_hex: str) -> Signer:
    """The ephemeral signer of this seed; also how it unpickles."""
    return Signer(Keypair.create_from_seed(seed_hex), ephemeral=True, _rebuild=(_seed_signer, (seed_hex,)))


def _hotkey_signer(path: str, expected_ss58: str | None = None) -> Signer:
    """The hotkey in the file at `path`; also how it unpickles, where the file must still hold the same key."""
    keypair = _read_hotkey(path)
    if expected_ss58 is not None and keypair.ss58_address != expected_ss58:
        raise UserError(f"hotkey file {path} now holds {keypair.ss58_address}, not {expected_ss58}: "
                        f"it changed while the miner was running")
    return Signer(keypair, _rebuild=(_hotkey_signer, (path, keypair.ss58_address)))


def verify_signature(ss58_address: str, data: bytes, signature: bytes) -> bool:
    """Whether `signature` is the address's sr25519 signature of `data`, as the validator checks it.

    A malformed address or signature is a failed check, not an exception.
    """
    try:
        return bool(Keypair(ss58_address=ss58_address).verify(data, signature))
    except Exception:  # the library raises ValueError and its own types for malformed input
        return False


def load_signer(required: bool, env: Mapping[str, str] = os.environ) -> Signer:
    """The hotkey named by BT_WALLET_COLD / BT_WALLET_HOT under BT_WALLET_PATH.

    Without those variables, `required` (the daemon) is a user error, otherwise (the benchmark) an
    ephemeral key with a warning. Variables that are set but lead to an unusable key are always a
    user error: a typo must not silently turn into a throw-away key.
    """
    cold, hot = env.get(ENV_COLD, "").strip(), env.get(ENV_HOT, "").strip()
    if not cold and not hot:
        if required:
            raise UserError(f"no wallet configured: set {ENV_COLD} and {ENV_HOT} "
                            f"(and {ENV_PATH}, default {DEFAULT_WALLET_PATH})")
        logger.warning("no wallet configured (%s/%s unset): signing with an ephemeral in-memory hotkey",
                       ENV_COLD, ENV_HOT)
        return ephemeral_signer()
    if not cold or not hot:
        missing, present = (ENV_COLD, ENV_HOT) if not cold else (ENV_HOT, ENV_COLD)
        raise UserError(f"{present} is set but {missing} is not: set both to name the wallet and its hotkey")
    root = os.path.expanduser(env.get(ENV_PATH, "").strip() or DEFAULT_WALLET_PATH)
    return _hotkey_signer(Wallet(name=cold, hotkey=hot, path=root).hotkey_file.path)


def parse_wallet_names(text: str, name: str) -> list[tuple[str, str]]:
    """`cold/hot,cold/hot,…`: the wallets (by name, never key material) of several hotkeys, in the order given."""
    pairs: list[tuple[str, str]] = []
    for item in text.split(","):
        cold, slash, hot = item.strip().partition("/")
        cold, hot = cold.strip(), hot.strip()
        if not slash or not cold or not hot or "/" in hot:
            raise UserError(f"{name}: {item.strip()!r} is not COLDKEY/HOTKEY (wallet names, e.g. cold/hot1,cold/hot2)")
        if (cold, hot) in pairs:
            raise UserError(f"{name}: {cold}/{hot} is named twice")
        pairs.append((cold, hot))
    return pairs


def parse_hotkey_addresses(texts: list[str], name: str) -> list[str]:
    """Hotkey ss58 addresses, each text one or a comma list, in the order given: a malformed address (a typo that
    would name nobody's keys) or one named twice is a UserError line, never silently nothing."""
    from bittensor_wallet.utils import is_valid_ss58_address

    addresses: list[str] = []
    for text in texts:
        for item in text.split(","):
            address = item.strip()
            if not is_valid_ss58_address(address):
                raise UserError(f"{name}: {address!r} is not a hotkey's ss58 address (48 characters, e.g. 5F...)")
            if address in addresses:
                raise UserError(f"{name}: {address} is named twice")
            addresses.append(address)
    return addresses


def load_signers(wallets: list[tuple[str, str]], env: Mapping[str, str] = os.environ) -> list[Signer]:
    """The hotkeys of `wallets` (cold, hot) under BT_WALLET_PATH, in order; two names for one key are an error."""
    signers: list[Signer] = []
    for cold, hot in wallets:
        signer = load_signer(required=True, env={**env, ENV_COLD: cold, ENV_HOT: hot})
        if any(s.ss58_address == signer.ss58_address for s in signers):
            raise UserError(f"wallet {cold}/{hot} holds hotkey {signer.ss58_address}, already named: each hotkey "
                            f"is mined once")
        signers.append(signer)
    return signers


def _read_hotkey(path: str) -> Keypair:
    """The hotkey in the file, or a UserError naming the file (never the library's text: it may quote the key)."""
    keyfile = Keyfile(path)
    if not keyfile.exists_on_device():
        raise UserError(f"hotkey file {path} does not exist (check {ENV_COLD}, {ENV_HOT} and {ENV_PATH})")
    if not os.path.isfile(path) or not keyfile.is_readable():
        raise UserError(f"hotkey file {path} is not a readable file")
    if keyfile.is_encrypted():
        raise UserError(f"hotkey file {path} is encrypted; the miner needs an unencrypted hotkey "
                        f"(btcli creates hotkeys unencrypted by default)")
    try:
        keypair = keyfile.get_keypair()
        keypair.sign(b"grail-pipeline key check")
    except Exception as exc:
        raise UserError(f"hotkey file {path} is not a usable hotkey ({type(exc).__name__}: corrupt, "
                        f"or it holds no private key)") from None
    return keypair


def sign_commit(signer: Signer, binding: bytes) -> str:
    """`commit.signature`: the hex signature over the commit binding (proof.commit_binding)."""
    return signer.sign(binding).hex()


def _verify_hex(ss58_address: str, data: bytes, signature_hex: str) -> bool:
    """verify_signature for a hex signature as stored in the record; bad hex fails the check."""
    try:
        signature = bytes.fromhex(signature_hex)
    except (ValueError, TypeError):
        return False
    return verify_signature(ss58_address, data, signature)


def verify_commit(ss58_address: str, binding: bytes, signature_hex: str) -> bool:
    """The validator's check of `commit.signature`."""
    return _verify_hex(ss58_address, binding, signature_hex)


def rollout_challenge(block_hash: str, nonce: int) -> str:
    """The top-level `challenge`: f"{episode_seed}|{block_hash}|{nonce}" with the seed absent, as the reference sends it."""
    return f"|{block_hash}|{nonce}"


def sign_rollout(signer: Signer, challenge: str) -> str:
    """The top-level `signature`: hex signature over the UTF-8 challenge."""
    return signer.sign(challenge.encode("utf-8")).hex()


def verify_rollout_signature(ss58_address: str, challenge: str, signature_hex: str) -> bool:
    """The validator's check of the top-level `signature` against `challenge` and `hotkey`."""
    return _verify_hex(ss58_address, challenge.encode("utf-8"), signature_hex)
