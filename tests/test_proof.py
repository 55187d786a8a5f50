"""Proof v1 math against the reference's golden data (tests/golden/proof.json) and the fact sheet's §9 vectors."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

from grail_pipeline.protocol.profile import PROFILE
from grail_pipeline.protocol.sketches import (
    commit_binding,
    commitments_to_dicts,
    hash_commitments,
    indices_from_root,
    log_magnitude_buckets,
    prf,
    r_vec,
    sketch_at_indices,
    sketch_distance,
    sketch_hidden,
)

GOLDEN = json.loads((Path(__file__).parent / "golden" / "proof.json").read_text())
CASES = GOLDEN["cases"]
GOLDEN_MODEL = "Qwen/Qwen2.5-3B-Instruct"  # the model name the golden commit bindings were made with
R = hashlib.sha256(b"randomness").hexdigest()
R_VEC32 = [-113, 16, 41, -52, -22, -81, 3, 12, -59, 91, 8, -113, 89, -30, 15, -38,
           100, -42, -48, -65, 126, -53, 123, -91, -32, 50, 33, 120, 122, 100, -19, -45]


def test_constants_match_profile() -> None:
    constants = GOLDEN["constants"]
    assert constants == {
        "PRIME_Q": PROFILE.prime_q,
        "TOPK": PROFILE.proof_topk,
        "NUM_BUCKETS": PROFILE.proof_num_buckets,
        "COEFF_RANGE": PROFILE.proof_coeff_range,
    }


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_every_golden_bucket(dtype: torch.dtype) -> None:
    values = GOLDEN["buckets"]["values"]
    if dtype == torch.float32:  # only the values float32 holds exactly
        keep = [i for i, v in enumerate(values) if math.isinf(v) or float(torch.tensor(v, dtype=dtype)) == v]
    else:
        keep = list(range(len(values)))
    got = log_magnitude_buckets(torch.tensor([values[i] for i in keep], dtype=dtype))
    assert got.dtype == torch.int64
    assert got.tolist() == [GOLDEN["buckets"]["buckets"][i] for i in keep]


def test_bucket_edge_cases_and_fact_sheet_vectors() -> None:
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0])
    assert log_magnitude_buckets(special).tolist() == [0, 15, -15, 0, 0]
    values = torch.tensor([5e-7, 0.5, 1.0, -3.0, 100.0, -1000.0])
    assert log_magnitude_buckets(values).tolist() == [0, 0, 1, -3, 10, -15]
    assert log_magnitude_buckets(values, num_buckets=8).tolist() == [0, 0, 0, -1, 5, -7]


def test_prf_vector() -> None:
    expected = (
        "23ea414efb5ccde79205062870121378053f16c49fd98e645880f4aacca5a106"
        "21c24510ddd35de00bf21a30d332a438ced29db11789d92f3ebb06dde9aa3a18"
    )
    assert prf(b"sketch", bytes.fromhex(R), out_bytes=64).hex() == expected


def test_r_vec_vectors_and_hex_cleaning() -> None:
    vec = r_vec(R)
    assert vec.dtype == torch.int64 and vec.tolist() == R_VEC32
    assert r_vec(R, topk=16).tolist() == R_VEC32[:16]  # SHAKE is a stream: U's r_vec16 is a prefix
    assert r_vec(f"  0x{R}\n").tolist() == R_VEC32
    assert r_vec("abc").tolist() == r_vec("0abc").tolist()  # odd length is left-padded
    for case in CASES:
        assert r_vec(case["randomness"]).tolist() == case["r_vec"]


def _assert_same_commitment(got: dict, want: dict, hidden_row: torch.Tensor) -> None:
    """Equal, or (only where |h| ties reorder top-k) the same sketch and index set."""
    assert got["position"] == want["position"]
    assert got["sketch"] == want["sketch"]
    if got["indices"] != want["indices"]:
        assert set(got["indices"]) == set(want["indices"])
        magnitudes = hidden_row.abs()
        assert magnitudes[got["indices"]].tolist() == magnitudes[want["indices"]].tolist()


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_golden_commitments_and_hashes(case: dict) -> None:
    hidden = torch.tensor(case["hidden"], dtype=torch.float32)
    sketches, indices = sketch_hidden(hidden, r_vec(case["randomness"]))
    assert sketches.dtype == indices.dtype == torch.int64
    assert indices.shape == (hidden.shape[0], PROFILE.proof_topk)
    got = commitments_to_dicts(sketches, indices)
    assert len(got) == len(case["commitments"])
    for row, mine, theirs in zip(hidden, got, case["commitments"], strict=True):
        _assert_same_commitment(mine, theirs, row)
    assert hash_commitments(case["commitments"]) == case["commitments_sha256"]
    assert hash_commitments(got) == case["commitments_sha256"]
    binding = commit_binding(case["tokens"], case["randomness"], GOLDEN_MODEL, -1, case["commitments"])
    assert len(binding) == 32 and binding.hex() == case["commit_binding_sha256"]


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_validator_sketch_at_miner_indices_agrees(case: dict) -> None:
    hidden = torch.tensor(case["hidden"], dtype=torch.float32)
    r = r_vec(case["randomness"])
    sketches, indices = sketch_hidden(hidden, r)
    assert torch.equal(sketch_at_indices(hidden, indices, r), sketches)
    assert sketch_distance(sketch_at_indices(hidden * 4, indices, r), sketches).min() > 0


def test_sketch_distance_wraps_modulo_q() -> None:
    q = PROFILE.prime_q
    a = torch.tensor([0, 5, q - 1, 10])
    b = torch.tensor([q - 3, 5, 2, 60])
    assert sketch_distance(a, b).tolist() == [3, 0, 3, 50]


def test_sketch_is_non_negative_modulo_q() -> None:
    hidden = -torch.ones(2, 64) * 50  # all buckets negative
    r = torch.ones(PROFILE.proof_topk, dtype=torch.int64)
    sketches, _ = sketch_hidden(hidden, r)
    assert sketches.tolist() == [PROFILE.prime_q - 32 * 9] * 2


def test_hash_commitments_vector() -> None:
    commitments = [{"sketch": 5, "indices": [1, 2], "position": 0}]
    expected = hashlib.sha256(b'[{"indices": [1, 2], "position": 0, "sketch": 5}]').hexdigest()
    assert hash_commitments(commitments) == expected


def test_commit_binding_vector() -> None:
    binding = commit_binding([1, 2, 3], R, "Qwen/Qwen3-4B-Instruct-2507", -1,
                             [{"sketch": 5, "indices": [1, 2], "position": 0}])
    assert binding.hex() == "bbda13677cd263e25a2759b1586ed7ed3c305b8f2c46c5ab61462c659c82128c"


def test_indices_from_root_vectors() -> None:
    tokens = list(range(1000, 1200))
    assert indices_from_root(tokens, R, 100, 200, 16) == [
        103, 105, 110, 126, 130, 138, 143, 148, 157, 166, 167, 174, 175, 178, 182, 187]
    assert indices_from_root(tokens, R, 100, 200, 32) == [
        101, 103, 104, 105, 106, 109, 110, 124, 126, 130, 132, 134, 138, 143, 144, 145,
        147, 148, 154, 157, 166, 167, 168, 174, 175, 178, 181, 182, 184, 187, 191, 197]
    assert indices_from_root(tokens, R, 100, 110, 16) == list(range(100, 110))  # k capped at the range
    assert indices_from_root(tokens, R, 100, 100, 16) == []


def test_sketch_tolerance_profile() -> None:
    assert [PROFILE.sketch_tolerance_at(p) for p in (0, 100, 200, 500, 1000)] == [50, 75, 83, 91, 95]
