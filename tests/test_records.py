"""Rollout records and window Parquet files: shape, round trip, metadata, atomic writes, corrupt files."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grail_pipeline.common.errors import UserError
from grail_pipeline.protocol.profile import PROFILE
from grail_pipeline.protocol.records import (
    INFERENCE_SCHEMA,
    ROW_GROUP_ROWS,
    WRITE_OPTIONS,
    MalformedRow,
    WindowFileError,
    WindowFileWriter,
    build_rollout_record,
    grpo_advantages,
    read_window_file,
    records_table,
    write_window_file,
)

BLOCK_HASH = "0x496aca80e4d8f29fb8e8cd816c3afb48d3f103970b3a2ee1600c08ca67326dee"
RANDOMNESS = "67ddf5ce5b7cfd4c4081d2a6ce1c1235e4f240e4322c6b1e106a6cec47948f9c"
HOTKEY = "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY"
METADATA = {"wallet": HOTKEY, "window_start": 4350, "window_length": 30}


def make_record(group: int, index: int, prompt_length: int = 12, completion_length: int = 20,
                reward: float = 0.135, advantage: float = 0.5) -> dict[str, Any]:
    rng = random.Random(group * 100 + index)
    length = prompt_length + completion_length
    tokens = [rng.randrange(151936) for _ in range(length)]
    commitments = [{"sketch": rng.randrange(PROFILE.prime_q), "indices": rng.sample(range(2048), 32), "position": p}
                   for p in range(length)]
    logprobs = [0.0] * prompt_length + [-rng.random() * 5 for _ in range(completion_length)]
    nonce = PROFILE.nonce(group, index)
    return build_rollout_record(
        window_start=4350, block=4361, block_hash=BLOCK_HASH, randomness=RANDOMNESS, use_drand=True,
        checkpoint_window=4320, rollout_group=group, rollout_index=index, total_in_group=16, nonce=nonce,
        tokens=tokens, prompt_length=prompt_length, commitments=commitments, token_logprobs=logprobs,
        model_name="Qwen/Qwen2.5-3B-Instruct", commit_signature="ab" * 64, total_reward=reward,
        advantage=advantage, success=index % 2 == 0, assignment=[True, False, True, True, False],
        hotkey=HOTKEY, challenge=f"|{BLOCK_HASH}|{nonce}", signature="cd" * 64, timestamp=1.7e9 + index / 3,
    )


def assert_same_typed(a: Any, b: Any, where: str = "record") -> None:
    """Equal values AND equal Python types all the way down (1 == 1.0 == True would hide a type change)."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            assert_same_typed(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_typed(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_record_shape_matches_the_reference() -> None:
    record = make_record(3, 7, prompt_length=12, completion_length=20, reward=-0.111)
    assert list(record) == ["window_start", "block", "nonce", "block_hash", "randomness", "use_drand",
                            "rollout_group", "rollout_index", "total_in_group", "checkpoint_window", "commit",
                            "timestamp", "challenge", "hotkey", "signature"]
    commit = record["commit"]
    assert list(commit) == ["tokens", "commitments", "proof_version", "model", "signature", "beacon", "rollout"]
    assert list(commit["rollout"]) == ["trajectory", "total_reward", "advantage", "success", "token_logprobs",
                                       "prompt_length", "completion_length", "satisfied_clauses", "assignment"]
    assert record["nonce"] == 307 and record["challenge"] == f"|{BLOCK_HASH}|307"
    assert commit["proof_version"] == "v1"
    assert commit["model"] == {"name": "Qwen/Qwen2.5-3B-Instruct", "layer_index": -1}
    assert commit["beacon"] == {"randomness": RANDOMNESS} and record["randomness"] == RANDOMNESS
    rollout = commit["rollout"]
    assert rollout["completion_length"] == 20 and rollout["prompt_length"] == 12
    assert rollout["trajectory"] == [[0, [True, False, True, True, False], -0.111]]
    assert rollout["satisfied_clauses"] == 0


@pytest.mark.parametrize("kwargs", [{"prompt_length": 0}, {"prompt_length": 32}])
def test_record_rejects_a_rollout_without_prompt_or_completion(kwargs) -> None:
    record = make_record(0, 0)
    commit = record["commit"]
    args = dict(
        window_start=0, block=0, block_hash=BLOCK_HASH, randomness=RANDOMNESS, use_drand=True, checkpoint_window=0,
        rollout_group=0, rollout_index=0, total_in_group=16, nonce=0, tokens=commit["tokens"],
        prompt_length=12, commitments=commit["commitments"], token_logprobs=commit["rollout"]["token_logprobs"],
        model_name="m", commit_signature="", total_reward=0.0, advantage=0.0, success=False, assignment=[],
        hotkey=HOTKEY, challenge="", signature="",
    )
    build_rollout_record(**args)
    with pytest.raises(ValueError):
        build_rollout_record(**{**args, **kwargs})
    with pytest.raises(ValueError):
        build_rollout_record(**{**args, "token_logprobs": commit["rollout"]["token_logprobs"][:-1]})


def test_grpo_advantages() -> None:
    rewards = [1.135, 0.135, -0.2, 0.135]
    advantages = grpo_advantages(rewards)
    mean = sum(rewards) / 4
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / 4)
    assert advantages == pytest.approx([(r - mean) / std for r in rewards], abs=1e-12)
    assert abs(sum(advantages)) < 1e-9
    assert grpo_advantages([0.5] * 16) == [0.0] * 16  # zero spread: divided by 1e-8, not by zero
    assert grpo_advantages([]) == []


def test_round_trip_preserves_values_types_and_order(tmp_path: Path) -> None:
    records = [make_record(g, i, completion_length=16 + 3 * i) for g in range(3) for i in range(4)]
    random.Random(1).shuffle(records)  # the file keeps the order it is given
    path = tmp_path / f"{HOTKEY}-window-4350.parquet"
    write_window_file(path, records, {**METADATA, "timestamp": 1.7e9, "worker_id": 2, "partial": "false"})
    got, metadata = read_window_file(path)
    assert_same_typed(got, records)
    assert metadata == {"wallet": HOTKEY, "window_start": "4350", "window_length": "30", "timestamp": "1700000000.0",
                        "inference_count": str(len(records)), "worker_id": "2", "partial": "false"}


def test_file_schema_types_and_encoding(tmp_path: Path) -> None:
    path = tmp_path / "w.parquet"
    write_window_file(path, [make_record(0, 0), make_record(0, 1)], METADATA)
    schema = pq.read_schema(path)
    assert schema.remove_metadata().equals(INFERENCE_SCHEMA)
    commit = schema.field("commit").type
    assert commit.field("tokens").type == pa.list_(pa.int32())
    assert commit.field("commitments").type == pa.string()
    assert commit.field("beacon").type == pa.string()
    assert commit.field("model").type == pa.struct([("name", pa.string()), ("layer_index", pa.int32())])
    rollout = commit.field("rollout").type
    assert rollout.field("trajectory").type == pa.string()
    assert rollout.field("token_logprobs").type == pa.list_(pa.float64())
    assert rollout.field("assignment").type == pa.list_(pa.bool_())
    assert schema.field("rollout_index").type == pa.int32() and schema.field("nonce").type == pa.int64()
    assert set(schema.metadata) >= {b"wallet", b"window_start", b"window_length", b"inference_count", b"timestamp"}
    column = pq.ParquetFile(path).metadata.row_group(0).column(0)
    assert column.compression == "ZSTD" and column.is_stats_set  # about half snappy's bytes (issue #15)
    assert pq.read_table(path).num_rows == 2  # what the validator calls reads it
    raw_commitments = pq.read_table(path).column("commit").combine_chunks().field("commitments")[0].as_py()
    assert raw_commitments.startswith('[{"sketch":')  # JSON text inside the struct, as the validator expects


def test_a_full_window_is_written_in_row_groups_that_read_back(tmp_path: Path) -> None:
    """A 360-s H200 window (18,416 rollouts) in one row group could not be read (ROW_GROUP_ROWS says why)."""
    records = [make_record(g, i) for g in range(ROW_GROUP_ROWS // 16 * 2 + 1) for i in range(16)]
    path = tmp_path / "w.parquet"
    write_window_file(path, records, METADATA)
    row_groups = pq.ParquetFile(path).metadata
    sizes = [row_groups.row_group(i).num_rows for i in range(row_groups.num_row_groups)]
    assert sizes == [ROW_GROUP_ROWS, ROW_GROUP_ROWS, 16]
    got, metadata = read_window_file(path)
    assert [(r["rollout_group"], r["rollout_index"]) for r in got] == [(r["rollout_group"], r["rollout_index"])
                                                                       for r in records]
    assert metadata["inference_count"] == str(len(records))


@pytest.mark.parametrize("groups", [0, 1, ROW_GROUP_ROWS // 16, ROW_GROUP_ROWS // 16 * 2 + 3])
def test_a_file_written_as_its_groups_arrive_is_write_tables_bytes(tmp_path: Path, groups: int) -> None:
    """WindowFileWriter (the sink's: row groups encoded while the window runs, the footer and its metadata at
    the cut) gives, byte for byte, the file pyarrow's one-shot write_table gives for the same rows and metadata:
    what the validator reads is unchanged. Groups given one by one and in uneven batches; none, one, exactly one
    row group, and two row groups and a tail."""
    tables = [records_table([make_record(g, i, completion_length=8 + g % 5) for i in range(16)])
              for g in range(groups)]
    metadata = {"timestamp": 1.7e9, **METADATA, "cut_groups": 3}
    expected = tmp_path / "one-shot.parquet"
    whole = pa.concat_tables(tables) if tables else INFERENCE_SCHEMA.empty_table()
    pq.write_table(whole.replace_schema_metadata({**{k: str(v) for k, v in metadata.items()},  # timestamp first,
                                                  "inference_count": str(16 * groups)}),  # as written before
                   expected, row_group_size=ROW_GROUP_ROWS, **WRITE_OPTIONS)
    path = tmp_path / "w.parquet"
    writer = WindowFileWriter(path)
    given, rng = 0, random.Random(groups)
    while given < groups - 2:
        step = rng.choice([1, 1, 3, 7])
        writer.append(tables[given:given + step])
        given += len(tables[given:given + step])
    if groups >= ROW_GROUP_ROWS // 16:  # the full row groups are encoded by now, under a temporary name only
        assert [p.name.startswith(".w.parquet.") and p.name.endswith(".tmp") for p in tmp_path.iterdir()
                if p != expected] == [True] and not path.exists()
    writer.finish(metadata, tables[given:])
    assert path.read_bytes() == expected.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one-shot.parquet", "w.parquet"]
    assert read_window_file(path)[1]["cut_groups"] == "3"


def test_a_window_given_up_leaves_no_temporary(tmp_path: Path) -> None:
    writer = WindowFileWriter(tmp_path / "w.parquet")
    writer.append([records_table([make_record(g, i) for i in range(16)]) for g in range(ROW_GROUP_ROWS // 16)])
    assert len(list(tmp_path.iterdir())) == 1
    writer.abort()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError, match="closed"):  # its rows are gone: a file of the later ones would lie
        writer.append([records_table([make_record(99, 0)])])
    assert list(tmp_path.iterdir()) == []
    writer = WindowFileWriter(tmp_path / "w.parquet")
    writer.append([records_table([make_record(g, i) for i in range(16)]) for g in range(ROW_GROUP_ROWS // 16)])
    with pytest.raises(ValueError, match="wallet"):  # metadata checked before the footer: the temporary goes
        writer.finish({"window_start": 1, "window_length": 30})
    assert list(tmp_path.iterdir()) == []


def test_empty_window_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.parquet"
    write_window_file(path, [], METADATA)
    records, metadata = read_window_file(path)
    assert records == [] and metadata["inference_count"] == "0"


def test_metadata_needs_wallet_and_window(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="wallet"):
        write_window_file(tmp_path / "w.parquet", [make_record(0, 0)], {"window_start": 1, "window_length": 30})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage", ["token out of int32", "token not a number", "missing field", "extra field"])
def test_interrupted_write_leaves_no_file(tmp_path: Path, damage: str) -> None:
    bad = make_record(1, 1)
    if damage == "token out of int32":
        bad["commit"]["tokens"][3] = 2**40
    elif damage == "token not a number":
        bad["commit"]["tokens"][3] = "x"
    elif damage == "missing field":
        del bad["commit"]["rollout"]["advantage"]
    else:
        bad["commit"]["rollout"]["advantge"] = 0.1
    with pytest.raises((ValueError, pa.ArrowException)):
        write_window_file(tmp_path / "w.parquet", [make_record(1, 0), bad], METADATA)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_the_previous_file_and_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "w.parquet"
    first = [make_record(0, 0)]
    write_window_file(path, first, METADATA)
    bad = make_record(0, 1)
    bad["commit"]["tokens"][0] = -(2**40)
    with pytest.raises((ValueError, pa.ArrowException)):
        write_window_file(path, [bad], METADATA)
    assert [p.name for p in tmp_path.iterdir()] == ["w.parquet"]
    assert_same_typed(read_window_file(path)[0], first)


def test_rename_failure_removes_the_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "taken.parquet"
    target.mkdir()
    (target / "keep").write_text("x")  # a non-empty directory cannot be replaced by a file
    with pytest.raises(OSError):
        write_window_file(target, [make_record(0, 0)], METADATA)
    assert [p.name for p in tmp_path.iterdir()] == ["taken.parquet"]
    assert [p.name for p in target.iterdir()] == ["keep"]


def read_error(path: Path) -> str:
    with pytest.raises(WindowFileError) as info:
        read_window_file(path)
    assert isinstance(info.value, UserError)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    return message


def test_reading_a_truncated_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "w.parquet"
    write_window_file(path, [make_record(0, i) for i in range(4)], METADATA)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert "not a readable Parquet file" in read_error(path)


def test_reading_garbage_missing_or_foreign_files(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"PAR1 this is not parquet PAR1")
    assert "not a readable Parquet file" in read_error(garbage)
    assert "does not exist" in read_error(tmp_path / "absent.parquet")
    foreign = tmp_path / "foreign.parquet"
    pq.write_table(pa.table({"x": [1, 2]}), foreign)
    assert "schema" in read_error(foreign)


def test_a_malformed_json_field_stays_in_its_row(tmp_path: Path) -> None:
    """One row's broken JSON is that row's problem (verify fails it at its file row), not the file's."""
    path = tmp_path / "w.parquet"
    write_window_file(path, [make_record(0, 0), make_record(0, 1)], METADATA)
    rows = pq.read_table(path).to_pylist()
    rows[0]["commit"]["beacon"] = "{not json"
    pq.write_table(pa.Table.from_pylist(rows, schema=INFERENCE_SCHEMA), path)
    records, _ = read_window_file(path)
    assert isinstance(records[0], MalformedRow) and records[0].row == 0
    assert records[0].problem.startswith("commit.beacon is not JSON")
    assert_same_typed(records[1:], [make_record(0, 1)])
