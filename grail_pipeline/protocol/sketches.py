"""GRAIL proof v1 math: PRF, sketch coefficients, log-magnitude buckets, commitments and bindings.

Everything here is what the validator recomputes, so each function reproduces the public reference
bit for bit (golden data in tests/golden/proof.json). Nothing here runs the model: callers pass the
last hidden layer, and the commitment math runs on that tensor's device, vectorised over all
positions, with one copy to the CPU at the end.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from grail_pipeline.protocol.profile import PROFILE

SKETCH_LABEL = b"sketch"
OPEN_LABEL = b"open"
_DEADZONE = 1e-6


def prf(label: bytes, *parts: bytes, out_bytes: int) -> bytes:
    """SHAKE-256 of label||p1||...||pN: the reference's PRF (separators only between items)."""
    return hashlib.shake_256(b"||".join((label, *parts))).digest(out_bytes)


def randomness_bytes(randomness_hex: str) -> bytes:
    """Hex randomness as the reference reads it: stripped, without 0x, left-padded to even length."""
    clean = randomness_hex.strip().replace("0x", "").replace("0X", "")
    if len(clean) % 2:
        clean = "0" + clean
    return bytes.fromhex(clean)


def r_vec(randomness_hex: str, topk: int = PROFILE.proof_topk) -> torch.Tensor:
    """The sketch coefficients in [-R, R] (int64 [topk]) derived from the beacon randomness.

    numpy int16 arithmetic on purpose: the reference takes abs() of big-endian int16 values, which
    wraps -32768 to itself, and we must agree with it on that edge too.
    """
    raw = prf(SKETCH_LABEL, randomness_bytes(randomness_hex), out_bytes=2 * topk)
    int16 = np.frombuffer(raw, dtype=">i2").astype(np.int16)
    coeff_range = PROFILE.proof_coeff_range
    coeffs = (np.abs(int16) % (2 * coeff_range + 1)) - coeff_range
    return torch.from_numpy(coeffs.astype(np.int64))


def log_magnitude_buckets(values: torch.Tensor, num_buckets: int = PROFILE.proof_num_buckets) -> torch.Tensor:
    """Signed log2 magnitude buckets (int64, same shape and device), computed in float64.

    0 for |v| < 1e-6 or NaN, ±(B-1) for ±inf, else sign(v)·clamp(int(log2(|v|+1)·B/10), 0, B-1).
    """
    v = values.to(torch.float64)
    magnitude = v.abs()
    scaled = torch.log2(magnitude + 1.0) * (num_buckets / 10.0)
    # Clamp in float before the integer cast: casting inf to int64 is undefined.
    bucket = scaled.clamp(0, num_buckets - 1).to(torch.int64)
    bucket = torch.where(v >= 0, bucket, -bucket)
    dead = (magnitude < _DEADZONE) | torch.isnan(v)
    return torch.where(dead, torch.zeros_like(bucket), bucket)


def _sketch_values(values: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Σ bucket(v)·r mod Q per row, in exact int64 (non-negative, as Python's %)."""
    buckets = log_magnitude_buckets(values)
    return (buckets * r.to(device=values.device, dtype=torch.int64)).sum(dim=-1) % PROFILE.prime_q


def sketch_hidden(hidden: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The miner's commitments for all positions: (sketches int64 [L], indices int64 [L, K]).

    Indices are torch.topk(|h|) order (descending, as the reference, unsorted); top-k runs in the
    hidden states' own dtype so ties break as they do for the reference.
    """
    indices = torch.topk(hidden.abs(), PROFILE.proof_topk, dim=-1).indices
    return _sketch_values(hidden.gather(-1, indices), r), indices


def sketch_at_indices(hidden: torch.Tensor, indices: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """The validator's sketches [L]: its own hidden values at the miner's indices."""
    indices = indices.to(device=hidden.device, dtype=torch.int64)
    return _sketch_values(hidden.gather(-1, indices), r)


def sketch_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Modular distance min(|a−b|, Q−|a−b|), the quantity the validator compares to its tolerance."""
    diff = (a.to(torch.int64) - b.to(torch.int64)).abs()
    return torch.minimum(diff, PROFILE.prime_q - diff)


def commitments_to_dicts(sketches: torch.Tensor, indices: torch.Tensor) -> list[dict[str, Any]]:
    """The commitment dicts of the upload, `{"sketch", "indices", "position"}` for every position."""
    return _dicts(sketches.tolist(), indices.tolist())


def commitments_with_json(sketches: torch.Tensor | np.ndarray,
                          indices: torch.Tensor | np.ndarray) -> tuple[list[dict[str, Any]], bytes]:
    """The dicts and their compact sorted JSON together, converting the arrays to lists once (per rollout).

    Tensors in the pipeline's own thread, numpy arrays in a signing worker process (SigningPool).
    """
    sketch_list, index_lists = sketches.tolist(), indices.tolist()
    return _dicts(sketch_list, index_lists), _compact_json(sketch_list, index_lists)


def _dicts(sketch_list: list[int], index_lists: list[list[int]]) -> list[dict[str, Any]]:
    return [
        {"sketch": sketch, "indices": idx, "position": position}
        for position, (sketch, idx) in enumerate(zip(sketch_list, index_lists, strict=True))
    ]


def hash_commitments(commitments: Sequence[dict[str, Any]]) -> str:
    """sha256 hex of json.dumps(sort_keys=True) with default separators (what loop.py signs)."""
    return hashlib.sha256(json.dumps(list(commitments), sort_keys=True).encode()).hexdigest()


def hash_tokens(tokens: Sequence[int]) -> bytes:
    """sha256 of the tokens as 4-byte big-endian unsigned integers."""
    return hashlib.sha256(np.asarray(tokens, dtype=">u4").tobytes()).digest()


def compact_commitments_json(sketches: torch.Tensor, indices: torch.Tensor) -> bytes:
    """`json.dumps(commitments_to_dicts(...), sort_keys=True, separators=(",", ":"))`, built from the arrays.

    The binding hashes this text for every rollout; writing it directly is several times faster than
    encoding hundreds of dicts, and it holds the interpreter lock in shorter pieces.
    """
    return _compact_json(sketches.tolist(), indices.tolist())


def _compact_json(sketch_list: list[int], index_lists: list[list[int]]) -> bytes:
    rows = json.dumps(index_lists, separators=(",", ":"))[2:-2].split("],[")
    if rows == [""]:
        rows = []
    body = ",".join(f'{{"indices":[{row}],"position":{pos},"sketch":{sketch}}}'
                    for pos, (row, sketch) in enumerate(zip(rows, sketch_list, strict=True)))
    return f"[{body}]".encode()


def commit_binding(
    tokens: Sequence[int],
    randomness_hex: str,
    model_name: str,
    layer_index: int,
    commitments: Sequence[dict[str, Any]] | bytes,
) -> bytes:
    """The 32-byte digest the miner signs (`build_commit_binding`): domain, then length-prefixed parts.

    Unlike hash_commitments, the commitments are hashed with compact separators here; they may be
    given already encoded that way (`compact_commitments_json`).
    """
    if isinstance(commitments, bytes):
        compact = commitments
    else:
        compact = json.dumps(list(commitments), sort_keys=True, separators=(",", ":")).encode()
    parts = (
        hash_tokens(tokens),
        randomness_bytes(randomness_hex),
        model_name.encode("utf-8"),
        int(layer_index).to_bytes(4, "big", signed=True),
        hashlib.sha256(compact).digest(),
    )
    digest = hashlib.sha256(PROFILE.commit_domain)
    for part in parts:
        digest.update(len(part).to_bytes(4, "big"))
        digest.update(part)
    return digest.digest()


def indices_from_root(tokens: Sequence[int], randomness_hex: str, start: int, end: int, k: int) -> list[int]:
    """The validator's challenged positions in [start, end), sorted (`indices_from_root_in_range`)."""
    length = end - start
    if length <= 0:
        return []
    k = min(k, length)
    material = prf(OPEN_LABEL, hash_tokens(tokens), randomness_bytes(randomness_hex), out_bytes=32)
    rng = random.Random(material)
    if k < length * 0.1:
        relative = sorted(rng.sample(range(length), k))
    else:
        shuffled = list(range(length))
        rng.shuffle(shuffled)
        relative = sorted(shuffled[:k])
    return [start + i for i in relative]
