"""The fast encoders in proof.py against their plain definitions."""

from __future__ import annotations

import hashlib
import json
import random
import struct

import pytest
import torch

from grail_pipeline.protocol.profile import PROFILE
from grail_pipeline.protocol.sketches import (
    commit_binding,
    commitments_to_dicts,
    commitments_with_json,
    compact_commitments_json,
    hash_tokens,
    r_vec,
    sketch_hidden,
)


def plain_json(sketches: torch.Tensor, indices: torch.Tensor) -> bytes:
    return json.dumps(commitments_to_dicts(sketches, indices), sort_keys=True, separators=(",", ":")).encode()


@pytest.mark.parametrize("positions", [0, 1, 2, 37, 500])
def test_compact_commitments_json_is_the_json_dumps_text(positions) -> None:
    g = torch.Generator().manual_seed(positions)
    sketches = torch.randint(0, PROFILE.prime_q, (positions,), generator=g, dtype=torch.int64)
    indices = torch.randint(0, 4096, (positions, PROFILE.proof_topk), generator=g, dtype=torch.int64)
    if positions:
        sketches[0] = 0
        indices[-1, 0] = 0
    text = compact_commitments_json(sketches, indices)
    assert text == plain_json(sketches, indices)
    assert commitments_with_json(sketches, indices) == (commitments_to_dicts(sketches, indices), text)
    assert json.loads(text) == commitments_to_dicts(sketches, indices)
    # the binding hashes the same bytes whichever form it is given
    tokens = list(range(positions + 1))
    randomness = "ab" * 32
    assert (commit_binding(tokens, randomness, "m", -1, text)
            == commit_binding(tokens, randomness, "m", -1, commitments_to_dicts(sketches, indices)))


def test_compact_commitments_json_of_a_real_sketch() -> None:
    hidden = torch.randn(9, 64, generator=torch.Generator().manual_seed(2))
    sketches, indices = sketch_hidden(hidden, r_vec("12" * 32))
    assert compact_commitments_json(sketches, indices) == plain_json(sketches, indices)


def test_compact_commitments_json_with_one_index_per_position() -> None:
    sketches, indices = torch.tensor([5, 6]), torch.tensor([[3], [4]])
    assert compact_commitments_json(sketches, indices) == plain_json(sketches, indices)


def test_compact_commitments_json_refuses_mismatched_lengths() -> None:
    with pytest.raises(ValueError):
        compact_commitments_json(torch.tensor([1, 2]), torch.zeros(3, PROFILE.proof_topk, dtype=torch.int64))


@pytest.mark.parametrize("tokens", [[], [0], [151645], [1, 2, 3], [2**32 - 1, 0, 256],
                                    [random.Random(0).randrange(151936) for _ in range(300)]])
def test_hash_tokens_is_sha256_of_big_endian_uint32(tokens) -> None:
    expected = hashlib.sha256(b"".join(t.to_bytes(4, "big") for t in tokens)).digest()
    assert hash_tokens(tokens) == expected
    assert hash_tokens(tokens) == hashlib.sha256(struct.pack(f">{len(tokens)}I", *tokens)).digest()
    assert hash_tokens(tuple(tokens)) == expected
