"""The commitments' file text made where a rollout is signed: the window file's bytes are the same as when the
sink encoded the dicts itself, and the text survives the trip from a signing worker (pickle)."""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from grail_pipeline.protocol.profile import PROFILE
from grail_pipeline.protocol.records import (
    EncodedCommitments,
    build_rollout_record,
    commitments_file_text,
    read_window_file,
    write_window_file,
)
from grail_pipeline.protocol.sketches import commitments_with_json

HOTKEY = "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY"
METADATA = {"wallet": HOTKEY, "window_start": 4350, "window_length": 30, "timestamp": 1.7e9}


def record(index: int, encoded: bool) -> dict:
    rng = np.random.default_rng(index)
    length = 13 + 30 * index
    sketches = rng.integers(0, PROFILE.prime_q, length, dtype=np.int64)
    indices = rng.integers(0, 151936, (length, PROFILE.proof_topk), dtype=np.int64)
    commitments, binding = commitments_with_json(sketches, indices)  # what the signer builds for the binding
    if encoded:
        commitments = EncodedCommitments(commitments, commitments_file_text(binding))
    r = random.Random(index)
    return build_rollout_record(
        window_start=4350, block=4361, block_hash="0x" + "ab" * 32, randomness="cd" * 32, use_drand=True,
        checkpoint_window=4320, rollout_group=0, rollout_index=index, total_in_group=16, nonce=index,
        tokens=[r.randrange(151936) for _ in range(length)], prompt_length=12, commitments=commitments,
        token_logprobs=[0.0] * 12 + [-r.random() for _ in range(length - 12)], model_name="m",
        commit_signature="ab" * 64, total_reward=0.5, advantage=0.1, success=True, assignment=[True, False],
        hotkey=HOTKEY, challenge="c", signature="cd" * 64, timestamp=1.7e9 + index)


def test_file_text_is_the_dicts_json() -> None:
    for index in range(4):
        rec = record(index, encoded=True)
        commitments = rec["commit"]["commitments"]
        assert isinstance(commitments, EncodedCommitments)
        assert commitments.text == json.dumps(list(commitments), separators=(",", ":"))


def test_window_file_bytes_are_unchanged(tmp_path: Path) -> None:
    # through pickle, as records come back from a signing worker process
    encoded = pickle.loads(pickle.dumps([record(i, encoded=True) for i in range(4)]))
    assert all(isinstance(r["commit"]["commitments"], EncodedCommitments) for r in encoded)
    plain = [record(i, encoded=False) for i in range(4)]
    a, b = tmp_path / "encoded.parquet", tmp_path / "plain.parquet"
    write_window_file(a, encoded, METADATA)
    write_window_file(b, plain, METADATA)
    assert a.read_bytes() == b.read_bytes()
    assert pq.read_table(a).num_rows == 4  # what the validator's reader does
    records, _ = read_window_file(a)
    assert [r["commit"]["commitments"] for r in records] == [list(r["commit"]["commitments"]) for r in plain]
